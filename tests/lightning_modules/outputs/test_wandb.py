"""W&B logging end to end through the console script (offline, no credentials, no network) + local reports."""
from __future__ import annotations

import csv
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rsfusion.lightning_modules import reporting
from tests.conftest import tiny_config


def _records(path: Path):
    """The protobuf records of an offline run's ``run-*.wandb`` file (LevelDB log format, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if length == 0 and kind == 0:  # block padding
            pos += left
            continue
        chunk, pos = data[pos + header:pos + header + length], pos + header + length
        if kind in (1, 2):  # full / first
            pending = chunk
        else:  # middle / last
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _tiny_config(tmp_path: Path) -> Path:
    return tiny_config(tmp_path, "demo", dict(scene_height=32, scene_width=40, train_per_class=12, patch_size=5,
                                              batch_size=32), dict(width=8), max_epochs=2, log_every_n_steps=1)


def test_fit_logs_metrics_config_and_pictures_to_an_offline_wandb_run(tmp_path):
    script = shutil.which("rsfusion", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("console script 'rsfusion' not installed (pip install -e .)")
    # No WANDB_MODE and no credentials (empty HOME, no netrc): the run must go offline by itself.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env.update(HOME=str(tmp_path / "home"), WANDB_SILENT="true", PYTHONWARNINGS="ignore")
    out = subprocess.run([script, "fit", "--config", str(_tiny_config(tmp_path)), "--wandb.enabled", "true",
                          "--wandb.project", "rsfusion-test", "--wandb.group", "tiny", "--wandb.tags", "[ci, cnn]"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "version_0"
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")

    history: dict[str, list] = {}
    config, run_info = {}, None
    for record in _records(next(wandb_run.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                history.setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update if item.key})
        elif kind == "run":
            run_info = record.run
    assert run_info.project == "rsfusion-test" and run_info.run_group == "tiny" and list(run_info.tags) == ["ci", "cnn"]

    # every metric, per epoch: OA/AA/kappa and per-class accuracy for validation, the loss, the learning rate
    for key in ("val/OA", "val/AA", "val/kappa", "val/acc_Trees", "val/acc_Water"):
        assert len(history[key]) == 2, key
    assert "train/loss" in history and any(key.startswith("lr-AdamW") for key in history)
    assert "data/test_pixels_in_train_patches" in history
    # the test metrics match the CSV logger's, and the pictures are W&B media
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    csv_oa = [float(r["test/OA"]) for r in rows if r.get("test/OA")]
    assert history["test/OA"] == pytest.approx(csv_oa)
    assert history["test/confusion_matrix_table/_type"] == ["table-file"]
    assert history["test/confusion_matrix_image/_type"] == ["images/separated"]
    assert history["predict/classification_map/_type"] == ["images/separated"]
    media = {p.parent.name + "/" + p.name.split("_")[0] for p in (wandb_run / "files" / "media").rglob("*.png")}
    assert {"test/confusion", "predict/classification"} <= media
    # the full resolved config (not just the model's hyper-parameters) is the run's config
    assert config["model"]["class_path"] == "rsfusion.lightning_modules.TwoBranchCNN"
    assert config["model"]["init_args"]["width"] == 8 and config["trainer"]["max_epochs"] == 2
    assert config["wandb"]["group"] == "tiny" and config["lr"] == 0.003

    # the same pictures locally, next to config.yaml: the confusion matrix agrees with the logged OA
    with (run_dir / "reports" / "confusion_matrix.csv").open() as handle:
        table = list(csv.reader(handle))
    assert table[0][1:] == ["Trees", "Grass", "Roofs", "Roads", "Water", "Bare soil"]
    matrix = np.array([[int(v) for v in row[1:]] for row in table[1:]])
    assert matrix.shape == (6, 6) and np.trace(matrix) / matrix.sum() == pytest.approx(csv_oa[0], abs=1e-6)
    assert (run_dir / "reports" / "confusion_matrix.png").stat().st_size > 5000
    assert (run_dir / "predictions" / "classification_map.png").stat().st_size > 1000


def test_wandb_mode_defaults_to_offline_without_credentials(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert reporting.default_wandb_mode() == "offline"  # no netrc file at all
    (tmp_path / "netrc").write_text("machine example.org login x password y\n")
    assert reporting.default_wandb_mode() == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password secret\n")
    assert reporting.default_wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert reporting.default_wandb_mode() == "disabled"  # an explicit mode always wins
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert reporting.default_wandb_mode() == "online"


def test_an_unreachable_server_falls_back_to_an_offline_run(tmp_path, monkeypatch):
    import wandb

    calls = []

    class FakeRun:
        def __init__(self, mode):
            self.mode, self.metrics = mode, {}

        def define_metric(self, name, summary):
            self.metrics[name] = summary

    def fake_init(mode, **kwargs):
        calls.append((mode, kwargs["project"], kwargs["dir"]))
        if mode == "online":
            raise wandb.errors.CommError("failed to connect to api.wandb.ai")
        return FakeRun(mode)

    monkeypatch.setattr(wandb, "init", fake_init)
    with pytest.warns(UserWarning, match="W&B server not reachable.*logging offline"):
        run = reporting.start_wandb_run(reporting.WandbOptions(enabled=True, mode="online", project="p"), tmp_path)
    assert [c[0] for c in calls] == ["online", "offline"] and calls[1][1:] == ("p", str(tmp_path))
    assert run.mode == "offline" and run.metrics == {"val/OA": "max"}
    calls.clear()
    with pytest.raises(wandb.errors.CommError):  # an offline run that fails is a real error, not hidden
        monkeypatch.setattr(wandb, "init", lambda mode, **kw: (_ for _ in ()).throw(wandb.errors.CommError("x")))
        reporting.start_wandb_run(reporting.WandbOptions(enabled=True, mode="offline"), tmp_path)


def test_confusion_csv_and_png_from_counts(tmp_path):
    matrix = np.array([[5, 1, 0], [0, 3, 2], [0, 0, 0]])
    reporting.write_confusion_csv(tmp_path / "cm.csv", matrix, ["a", "b", "c"])
    rows = list(csv.reader((tmp_path / "cm.csv").open()))
    assert rows == [["true \\ predicted", "a", "b", "c"], ["a", "5", "1", "0"], ["b", "0", "3", "2"], ["c", "0", "0",
                                                                                                       "0"]]
    reporting.render_confusion_png(tmp_path / "cm.png", matrix, ["a", "b", "c"], title="t")  # empty row: no NaN
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
    chart = reporting.wandb_confusion_chart(matrix, ["a", "b", "c"], "t")
    counts = {(r[0], r[1]): r[2] for r in chart.table.data}
    assert counts[("a", "a")] == 5 and counts[("a", "b")] == 1 and counts[("b", "c")] == 2 and counts[("b", "b")] == 3


def test_progress_lines_every_tenth_with_eta():
    progress = reporting.Progress("full-scene prediction", bar=False)
    for done in range(1, 21):
        progress(done, 20)
    assert len(progress.lines) == 10
    assert progress.lines[0].startswith("full-scene prediction: 10 % (2/20), ")
    assert progress.lines[-1].startswith("full-scene prediction: 100 % (20/20)")
    assert progress.lines[-1].endswith("ETA 0.0 s")
    odd = reporting.Progress("bank", bar=False, every=0.25)
    for done in range(1, 8):
        odd(done, 7)
    assert [line.split(" (")[0] for line in odd.lines] == ["bank: 29 %", "bank: 57 %", "bank: 86 %", "bank: 100 %"]
