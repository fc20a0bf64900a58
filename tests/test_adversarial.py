"""A hostile but fair user, through the commands users type: every case is a console-script run (in this
process through ``cli.main``, or a real subprocess where the process itself matters: ``python -m``'s
``sys.path``, two processes, a file-size limit). Each asserts what the user sees (exit code 2 and one
line naming the file or option, never a traceback) and that nothing written is wrong or half-written.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from rsfusion.lightning_modules import evaluate, map_set
from rsfusion.lightning_modules.commands.cli import main
from tests.conftest import tiny_config

NAMES = ["Trees", "Grass", "Roofs", "Roads", "Water", "Bare soil"]
DATA = dict(scene_height=24, scene_width=28, train_per_class=8, patch_size=5, batch_size=32)
ENV = {**os.environ, "PYTHONPATH": "", "WANDB_MODE": "disabled", "MPLBACKEND": "Agg"}


def run(args: list[str], capsys) -> tuple[int, str, str]:
    """``rsfusion <args>`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: "), err[-2000:]
    for needle in needles:
        assert needle in line, line
    return line


def metrics_of(run_dir: Path) -> dict[str, float]:
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    return {k: float(v) for row in rows for k, v in row.items() if v and k.startswith("test/")}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A demo run of 2 epochs on a tiny scene: its config, run folder, best checkpoint and scene."""
    tmp = tmp_path_factory.mktemp("adversarial")
    config = tiny_config(tmp, "demo", DATA, dict(width=8), max_epochs=2, enable_model_summary=False)
    main(["fit", "--config", str(config), "--map_after_fit", "false"])
    run_dir = tmp / "runs" / "version_0"
    best = next((run_dir / "checkpoints").glob("best-*.ckpt"))
    return dict(tmp=tmp, config=config, run=run_dir, best=best, scene=tmp / "scene" / "hsi_dsm-seed0")


def crafted(checkpoint: Path, out: Path, **hparams) -> Path:
    """A copy of ``checkpoint`` with hyper-parameters changed (None removes one)."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for key, value in hparams.items():
        if value is None:
            ckpt["hyper_parameters"].pop(key, None)
        else:
            ckpt["hyper_parameters"][key] = value
    torch.save(ckpt, out)
    return out


# ----------------------------------------------------------------------------------- 1. AA
def test_aa_is_the_mean_over_the_classes_in_the_reference_in_test_and_evaluate(demo, tmp_path, capsys):
    """The issue's reproduction: class 6 removed from the test labels. AA is the mean over the 5 classes
    left (from the run's own confusion matrix), Bare soil has no accuracy, in ``test`` and ``evaluate``."""
    with rasterio.open(demo["scene"] / "test.tif") as src:
        labels, profile = src.read(1), src.profile
    labels[labels == 6] = 0
    test_labels = tmp_path / "test_without_class_6.tif"
    with rasterio.open(test_labels, "w", **profile) as dst:
        dst.write(labels, 1)
    root = tmp_path / "runs"
    scene = demo["scene"]
    data = (f"{{class_path: RasterDataModule, init_args: {{modalities: {{hsi: {scene / 'hsi.tif'}, dsm: "
            f"{scene / 'dsm.tif'}}}, train_labels: {scene / 'train.tif'}, val_labels: {scene / 'val.tif'}, "
            f"test_labels: {test_labels}, class_names: [{', '.join(NAMES)}], patch_size: 5}}}}")
    code, _, err = run(["test", "--config", str(demo["config"]), "--ckpt_path", str(demo["best"]), "--data", data,
                        "--trainer.default_root_dir", str(root)], capsys)
    assert code == 0, err
    logged = metrics_of(root / "version_0")
    confusion = np.loadtxt(root / "version_0" / "reports" / "confusion_matrix.csv", delimiter=",", skiprows=1,
                           usecols=range(1, 7))
    present = confusion.sum(1) > 0
    assert present.tolist() == [True] * 5 + [False]
    recall = np.diag(confusion)[present] / confusion.sum(1)[present]
    assert logged["test/AA"] == pytest.approx(recall.mean(), abs=1e-6)
    assert np.isnan(logged["test/acc_Bare soil"])
    code, _, err = run(["predict", "--config", str(demo["config"]), "--ckpt_path", str(demo["best"]),
                        "--trainer.default_root_dir", str(root), "--map.output_dir", str(tmp_path / "map")], capsys)
    assert code == 0, err
    code, out, err = run(["evaluate", "--map", str(tmp_path / "map" / "classification_map.tif"), "--labels",
                          str(test_labels), "--class_names", *NAMES, "--output", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["AA"] == pytest.approx(logged["test/AA"], abs=1e-6)
    assert report["per_class"]["Bare soil"]["accuracy"] is None
    assert "no reference pixels" in out


# ----------------------------------------------------------------------------------- 2. trust boundary
SENTINEL = """
from pathlib import Path
Path(__file__).with_name("IMPORTED").write_text("a checkpoint made rsfusion import this module")
class Thing:
    pass
def make(*args, **kwargs):
    return None
"""


@pytest.fixture
def sentinel(tmp_path, monkeypatch):
    """A folder holding ``sentinel_mod.py`` (writes IMPORTED when imported), first on ``sys.path`` as
    ``python -m`` from that folder would put it."""
    (tmp_path / "sentinel_mod.py").write_text(SENTINEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("sentinel_mod", None)


def test_a_checkpoint_naming_a_foreign_class_imports_nothing_python_m_predict(demo, sentinel):
    crafted(demo["best"], sentinel / "model.ckpt", _class_path="sentinel_mod.Thing")
    data = f"{{modalities: {{hsi: {demo['scene'] / 'hsi.tif'}, dsm: {demo['scene'] / 'dsm.tif'}}}}}"
    out = subprocess.run([sys.executable, "-m", "rsfusion.lightning_modules", "predict", "--ckpt_path", "model.ckpt",
                          "--data", data, "--trainer.default_root_dir", "runs"], cwd=sentinel, env=ENV,
                         capture_output=True, text=True, timeout=300)
    one_line_error(out.returncode, out.stderr, "model.ckpt", "'sentinel_mod.Thing'", "not one of rsfusion's tasks")
    assert not (sentinel / "IMPORTED").exists()
    assert not (sentinel / "runs").exists()


@pytest.mark.parametrize("command", ["test", "fit", "export", "predict"])
def test_a_checkpoint_naming_a_foreign_class_imports_nothing(demo, sentinel, capsys, command):
    ckpt = crafted(demo["best"], sentinel / "model.ckpt", _class_path="sentinel_mod.Thing")
    args = {"export": ["export", "--ckpt_path", str(ckpt), "--output", str(sentinel / "m.pt2")],
            "predict": ["predict", "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(sentinel / "runs")]}
    argv = args.get(command, [command, "--config", str(demo["config"]), "--ckpt_path", str(ckpt),
                              "--trainer.default_root_dir", str(sentinel / "runs")])
    code, _, err = run(argv, capsys)
    one_line_error(code, err, str(ckpt), "'sentinel_mod.Thing'")
    assert not (sentinel / "IMPORTED").exists()


def test_a_checkpoint_naming_a_foreign_instantiator_imports_nothing(demo, sentinel, capsys):
    ckpt = crafted(demo["best"], sentinel / "model.ckpt", _instantiator="sentinel_mod.make")
    code, _, err = run(["export", "--ckpt_path", str(ckpt), "--output", str(sentinel / "m.pt2")], capsys)
    one_line_error(code, err, str(ckpt), "'sentinel_mod.make'")
    assert not (sentinel / "IMPORTED").exists()


def test_a_pickle_payload_in_a_checkpoint_is_refused(demo, tmp_path, capsys):
    ckpt = torch.load(demo["best"], map_location="cpu", weights_only=True)
    ckpt["payload"] = Path("anything")  # not a tensor or a plain type: only an unpickler would build it
    torch.save(ckpt, tmp_path / "pickled.ckpt")
    code, _, err = run(["test", "--config", str(demo["config"]), "--ckpt_path", str(tmp_path / "pickled.ckpt")],
                       capsys)
    one_line_error(code, err, "pickled.ckpt", "not a readable checkpoint")


# ----------------------------------------------------------------------------------- 3. maps as a set
def _predict_args(demo, out: Path, *extra: str) -> list[str]:
    return ["predict", "--config", str(demo["config"]), "--ckpt_path", str(demo["best"]), "--trainer.default_root_dir",
            str(out.parent / "runs"), "--map.output_dir", str(out), *extra]


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: map_set.sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_failed_repredict_leaves_the_previous_set_whole(demo, tmp_path, capsys, monkeypatch):
    out = tmp_path / "maps"
    assert run(_predict_args(demo, out, "--map.probabilities", "float16"), capsys)[0] == 0
    before = _digests(out)
    assert set(before) == {"classification_map.tif", "classification_map.tif.aux.xml", "classification_map.png",
                           "classification_map_probabilities.tif", "classification_map.manifest.json"}

    def fail(*args, **kwargs):
        raise RuntimeError("killed while rendering the preview")

    monkeypatch.setattr("rsfusion.lightning_modules.outputs.maps.render_png", fail)
    with pytest.raises(RuntimeError, match="killed while rendering"):
        main(_predict_args(demo, out, "--map.probabilities", "float16", "--map.confidence", "max"))
    assert _digests(out) == before  # the new rasters never reached the folder
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no staging, parts or lock left


def test_a_set_interrupted_while_committing_is_refused_by_evaluate_then_replaced(demo, tmp_path, capsys,
                                                                                 monkeypatch):
    out = tmp_path / "maps"
    assert run(_predict_args(demo, out), capsys)[0] == 0
    real_replace, moved = os.replace, []

    class Killed(BaseException):
        """The process stops after the first file was renamed into place."""

    def replace_then_die(src, dst):  # only the commit's renames, staging folder -> output folder
        if Path(src).parent.name.startswith(".classification_map.staging-") and Path(dst).parent == out:
            if moved:
                raise Killed
            moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(map_set.os, "replace", replace_then_die)
    with pytest.raises(Killed):
        main(_predict_args(demo, out, "--map.probabilities", "uint8", "--map.confidence", "max"))
    monkeypatch.setattr(map_set.os, "replace", real_replace)
    assert not (out / "classification_map.manifest.json").exists()
    assert len(moved) == 1  # one file of the new set in place, the others not: no manifest says it is whole
    code, _, err = run(["evaluate", "--map", str(out / "classification_map.tif"), "--labels",
                        str(demo["scene"] / "test.tif")], capsys)
    one_line_error(code, err, "classification_map.tif", "did not finish")
    # the next prediction takes over: leftovers removed, a complete set whose rasters agree
    assert run(_predict_args(demo, out, "--map.probabilities", "float16", "--map.confidence", "max"), capsys)[0] == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"classification_map.tif", "classification_map.tif.aux.xml", "classification_map.png",
                     "classification_map_probabilities.tif", "classification_map_confidence.tif",
                     "classification_map.manifest.json"}
    with rasterio.open(out / "classification_map_probabilities.tif") as p, \
            rasterio.open(out / "classification_map_confidence.tif") as c, \
            rasterio.open(out / "classification_map.tif") as m:
        probs, conf, classes = p.read(), c.read(1), m.read(1)
    # every pixel from one prediction (float16 probabilities, float32 confidence: equal to half precision)
    np.testing.assert_allclose(conf, probs.max(0), atol=1e-3, rtol=0)
    chosen = np.take_along_axis(probs, classes[None].astype(np.int64) - 1, axis=0)[0]
    np.testing.assert_allclose(chosen, probs.max(0), atol=1e-3, rtol=0)
    manifest = json.loads((out / "classification_map.manifest.json").read_text())
    assert manifest["files"] == {k: v for k, v in _digests(out).items() if k != "classification_map.manifest.json"}
    assert manifest["checkpoint"] == str(demo["best"])
    code, _, err = run(["evaluate", "--map", str(out / "classification_map.tif"), "--labels",
                        str(demo["scene"] / "test.tif")], capsys)
    assert code == 0, err


def test_a_changed_map_is_refused_by_evaluate(demo, tmp_path, capsys):
    out = tmp_path / "maps"
    assert run(_predict_args(demo, out), capsys)[0] == 0
    with rasterio.open(out / "classification_map.tif", "r+") as dst:
        classes = dst.read(1)
        classes[0, 0] = classes[0, 0] % 6 + 1
        dst.write(classes, 1)
    code, _, err = run(["evaluate", "--map", str(out / "classification_map.tif"), "--labels",
                        str(demo["scene"] / "test.tif")], capsys)
    one_line_error(code, err, "classification_map.tif", "differ from classification_map.manifest.json")


# ----------------------------------------------------------------------------------- 4. concurrent predicts
@pytest.mark.slow
def test_a_second_predict_into_a_folder_being_written_is_refused_and_the_first_completes(demo, tmp_path):
    """Process A predicts into M and is frozen (SIGSTOP) while it holds M; process B, into M with another
    checkpoint, is refused in one line; A then finishes a complete map of its own checkpoint."""
    out = tmp_path / "M"
    other = demo["run"] / "checkpoints" / "last.ckpt"
    base = [sys.executable, "-m", "rsfusion.lightning_modules", "predict", "--config", str(demo["config"]),
            "--trainer.enable_progress_bar", "false", "--map.output_dir", str(out)]
    first = subprocess.Popen([*base, "--ckpt_path", str(demo["best"]), "--data.init_args.eval_batch_size", "1",
                              "--trainer.default_root_dir", str(tmp_path / "a")], env=ENV, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / ".classification_map.lock" / "owner.json").exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGSTOP)
        second = subprocess.run([*base, "--ckpt_path", str(other), "--trainer.default_root_dir", str(tmp_path / "b")],
                                env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        one_line_error(second.returncode, second.stderr, str(out), f"pid {first.pid}", "another prediction")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    with rasterio.open(out / "classification_map.tif") as src:
        classes = src.read(1)
    assert (classes > 0).all()  # every pixel of the scene, from the first checkpoint alone
    assert json.loads((out / "classification_map.manifest.json").read_text())["checkpoint"] == str(demo["best"])
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_a_lock_left_by_a_killed_predict_is_taken_over(demo, tmp_path, capsys):
    out = tmp_path / "maps"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    (out / ".classification_map.lock").mkdir(parents=True)
    (out / ".classification_map.lock" / "owner.json").write_text(json.dumps(
        {"pid": dead.pid, "host": os.uname().nodename, "set": "x", "started": "earlier"}))
    (out / ".classification_map.parts-x").mkdir()
    (out / ".classification_map.tif.abcd.part.tif").write_bytes(b"half a file")
    code, _, err = run(_predict_args(demo, out), capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["classification_map.manifest.json", "classification_map.png",
                                                     "classification_map.tif", "classification_map.tif.aux.xml"]


# ----------------------------------------------------------------------------------- 5. outputs under the root
def test_a_list_of_loggers_keeps_every_output_under_the_root(demo, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("WANDB_MODE", "offline")
    root = tmp_path / "root"
    code, _, err = run(["fit", "--config", str(demo["config"]), "--trainer.logger+=WandbLogger",
                        "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(root)], capsys)
    assert code == 0, err
    assert not list((tmp_path / "cwd").iterdir())  # nothing in the working directory
    run_dir = root / "version_0"
    for path in ("config.yaml", "metrics.csv", "checkpoints/last.ckpt", "predictions/classification_map.tif",
                 "reports/confusion_matrix.csv"):
        assert (run_dir / path).is_file(), path
    assert list((root / "wandb").glob("offline-run-*"))


def test_a_run_version_that_leaves_the_root_is_refused(demo, tmp_path, capsys):
    code, _, err = run(["fit", "--config", str(demo["config"]), "--trainer.logger.init_args.version", "../../X",
                        "--trainer.default_root_dir", str(tmp_path / "root")], capsys)
    one_line_error(code, err, "'../../X'", "not a path")
    assert not (tmp_path / "X").exists() and not (tmp_path / "root").exists()


# ----------------------------------------------------------------------------------- 6. resume
def test_resume_after_a_kill_right_after_a_best_save_keeps_one_best_file(demo, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(demo["run"], root / "version_0")
    checkpoints = root / "version_0" / "checkpoints"
    (best,) = checkpoints.glob("best-*.ckpt")
    stale = checkpoints / "best-epoch=01-v1.ckpt"  # saved after last.ckpt, as a kill at that moment leaves it
    shutil.copy(best, stale)
    os.utime(stale, (time.time() + 5, time.time() + 5))
    code, out, err = run(["fit", "--config", str(demo["config"]), "--ckpt_path", "last", "--trainer.max_epochs", "3",
                          "--trainer.default_root_dir", str(root), "--test_after_fit", "false", "--map_after_fit",
                          "false"], capsys)
    assert code == 0, err
    assert len(list(checkpoints.glob("best-*.ckpt"))) == 1
    assert not stale.exists()


def test_ckpt_path_last_is_the_newest_last_checkpoint_of_any_run(demo, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    root = tmp_path / "root"
    shutil.copytree(demo["run"], root / "version_0")
    (root / "version_1" / "checkpoints").mkdir(parents=True)
    newer_best_only = root / "version_1" / "checkpoints" / "best-epoch=00.ckpt"
    shutil.copy(demo["best"], newer_best_only)
    code, out, err = run(["fit", "--config", str(demo["config"]), "--ckpt_path", "last", "--trainer.max_epochs", "3",
                          "--trainer.default_root_dir", str(root), "--test_after_fit", "false", "--map_after_fit",
                          "false"], capsys)
    assert code == 0, err
    assert f"--ckpt_path last: {root / 'version_0' / 'checkpoints' / 'last.ckpt'}" in caplog.text
    assert "starting a new run" not in caplog.text
    assert sorted(p.name for p in root.iterdir()) == ["version_0", "version_1"]  # resumed, no new run


# ----------------------------------------------------------------------------------- 7. nothing trained
def test_a_fit_of_zero_epochs_does_not_test_or_map_an_untrained_model(demo, tmp_path, capsys):
    root = tmp_path / "root"
    with pytest.warns(UserWarning, match=r"the fit saved no checkpoint \(0 training steps; max_epochs 0\?\)"):
        code, out, err = run(["fit", "--config", str(demo["config"]), "--trainer.max_epochs", "0",
                              "--trainer.default_root_dir", str(root)], capsys)
    assert code == 0, err
    assert "test/OA" not in out
    assert not list(root.glob("*/predictions/*"))


# ----------------------------------------------------------------------------------- 8. one-line errors
def test_one_line_errors_for_bad_options_and_files(demo, tmp_path, capsys):
    config = str(demo["config"])
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(demo["best"].read_bytes()[:5000])
    root = ["--trainer.default_root_dir", str(tmp_path / "runs")]
    cases = [
        (["fit", "--config", config, "--data.init_args.batch_size", "0"], ["batch_size", "got 0"]),
        (["fit", "--config", config, "--data.init_args.batch_size", "-3"], ["batch_size", "got -3"]),
        (["fit", "--config", config, "--data", f"{{class_path: RasterDataModule, init_args: {{modalities: {{hsi: "
                                               f"{empty}}}, train_labels: {demo['scene'] / 'train.tif'}, "
                                               f"test_labels: {demo['scene'] / 'test.tif'}}}}}"], [str(empty)]),
        (["fit", "--config", config, "--data", f"{{class_path: RasterDataModule, init_args: {{modalities: {{hsi: "
                                               f"{demo['scene'] / 'hsi.tif'}}}, train_labels: "
                                               f"{demo['scene'] / 'train.tif'}}}}}"],
         ["train_labels and test_labels", "given train_labels:"]),
        (["test", "--config", config, "--ckpt_path", str(tmp_path / "missing.ckpt")], ["missing.ckpt", "not found"]),
        (["fit", "--config", config, "--ckpt_path", str(tmp_path / "missing.ckpt")], ["missing.ckpt", "not found"]),
        (["predict", "--config", config, "--ckpt_path", str(tmp_path / "missing.ckpt")], ["missing.ckpt",
                                                                                           "not found"]),
        (["predict", "--ckpt_path", str(tmp_path / "missing.ckpt")], ["missing.ckpt", "not found"]),
        (["test", "--config", config, "--ckpt_path", str(truncated)], ["truncated.ckpt", "not a readable"]),
        (["fit", "--config", config, "--ckpt_path", str(truncated)], ["truncated.ckpt", "not a readable"]),
        (["predict", "--config", config, "--ckpt_path", str(crafted(
            demo["best"], tmp_path / "m3amba.ckpt", _class_path="rsfusion.lightning_modules.m3amba.M3amba"))],
         ["m3amba.ckpt", "holds a M3amba model", "builds TwoBranchCNN"]),
        (["test", "--config", config, "--ckpt_path", str(crafted(demo["best"], tmp_path / "extra.ckpt",
                                                                  mystery_option=3))],
         ["extra.ckpt", "'mystery_option'", "not an argument of TwoBranchCNN"]),
    ]
    for args, needles in cases:
        code, _, err = run([*args, *root], capsys)
        one_line_error(code, err, *needles)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())  # no empty version_N


def test_a_map_that_hits_a_file_size_limit_is_one_line_naming_it(demo, tmp_path):
    """The map written under a file-size limit (what a full disk does to the same write): one line."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (6_000, 6_000))

    out = subprocess.run([sys.executable, "-m", "rsfusion.lightning_modules", *_predict_args(
        demo, tmp_path / "maps", "--map.probabilities", "float16"), "--trainer.enable_progress_bar", "false"],
        env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    one_line_error(out.returncode, out.stderr, str(tmp_path / "maps" / "classification_map.tif"), "cannot write")
    assert "file too large" in out.stderr or "file-size limit" in out.stderr
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == []  # no set, no leftovers


def test_write_failures_are_named_for_what_they_are(tmp_path):
    import errno

    target = tmp_path / "classification_map.tif"
    assert "no space left" in str(map_set.write_failure(OSError(errno.ENOSPC, "No space left on device"), target))
    assert "file too large" in str(map_set.write_failure(OSError(errno.EFBIG, "File too large"), target))
    gdal = map_set.write_failure(RuntimeError("TIFFAppendToStrip:Write error; WriteEncodedTile/Strip() failed"), target)
    assert str(target) in str(gdal) and "free on its disk" in str(gdal)
    assert map_set.write_failure(ValueError("unrelated"), target) is None


def test_bad_rasters_are_still_one_line(tmp_path, capsys, real_rasters):
    config = tiny_config(tmp_path, "demo", DATA, dict(width=8))
    corrupt = next(p for p in real_rasters.iterdir() if "corrupt" in p.name.lower())
    data = f"{{class_path: RasterDataModule, init_args: {{modalities: {{hsi: {corrupt}}}, class_names: [a, b]}}}}"
    code, _, err = run(["predict", "--config", str(config), "--data", data], capsys)
    one_line_error(code, err, corrupt.name)


def test_evaluate_refuses_nothing_of_another_tool(tmp_path, capsys):
    """A map without rsfusion's set tag (another tool's) is scored as it is."""
    from tests.conftest import write_tif

    labels = np.array([[1, 2], [2, 1]], dtype=np.uint8)
    write_tif(tmp_path / "other.tif", labels)
    write_tif(tmp_path / "labels.tif", labels)
    report = evaluate.evaluate_map(str(tmp_path / "other.tif"), str(tmp_path / "labels.tif"))
    assert report["OA"] == 1.0

