"""Where a run's outputs go: everything under ``--trainer.default_root_dir``, one folder per run, ``last``/``best``."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

DEMO = str(ROOT / "configs" / "demo.yaml")
NOISE = ("LeafSpec", "Tip: For seamless cloud", "multiple `ModelCheckpoint`")


def _tiny(scene: Path, root: Path, epochs: int = 1) -> list[str]:
    """``--config configs/demo.yaml`` shrunk, its outputs under ``root``."""
    return ["--config", DEMO, "--data.init_args.root", str(scene), "--data.init_args.scene_height", "24",
            "--data.init_args.scene_width", "32", "--data.init_args.train_per_class", "10",
            "--data.init_args.patch_size", "5", "--data.init_args.batch_size", "32", "--model.init_args.width", "8",
            "--trainer.max_epochs", str(epochs), "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(root)]


def _lightning(args: list[str], cwd: Path) -> str:
    script = shutil.which("lightning", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("console script 'lightning' not installed (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # warnings as a user sees them
    out = subprocess.run([script, *args], cwd=cwd, env={**env, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def _files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _test_oa(output: str) -> str:
    return next(line.replace("│", " ").split()[1] for line in output.splitlines()
                if line.replace("│", " ").split()[:1] == ["test/OA"])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """``lightning fit`` of the demo, from an empty working directory, with its root elsewhere."""
    tmp = tmp_path_factory.mktemp("first")
    (tmp / "cwd").mkdir()
    output = _lightning(["fit", *_tiny(tmp / "scene", tmp / "d")], tmp / "cwd")
    return tmp, output


def test_every_output_of_a_run_goes_under_its_root_and_the_demo_prints_no_noise(first_run):
    tmp, output = first_run
    assert not list((tmp / "cwd").iterdir())  # nothing under ./runs or anywhere in the working directory
    outside = [p for p in tmp.rglob("*") if p.is_file() and not p.is_relative_to(tmp / "d")
               and not p.is_relative_to(tmp / "scene")]
    assert outside == []
    run = tmp / "d" / "version_0"
    assert {p.name for p in (tmp / "d").iterdir()} == {"version_0"}
    for name in ("config.yaml", "metrics.csv", "predictions/classification_map.tif", "reports/confusion_matrix.csv",
                 "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    assert [p.name for p in (run / "checkpoints").glob("best-*.ckpt")] == ["best-epoch=00.ckpt"]
    assert f"Evaluating the best checkpoint (val/OA): {run / 'checkpoints' / 'best-epoch=00.ckpt'}" in output
    for message in NOISE:
        assert message not in output, message


def test_test_ckpt_path_best_in_a_fresh_process_finds_the_runs_best_checkpoint(first_run):
    tmp, fit_output = first_run
    before = _files(tmp / "d" / "version_0")
    output = _lightning(["test", *_tiny(tmp / "scene", tmp / "d"), "--ckpt_path", "best"], tmp / "cwd")
    best = tmp / "d" / "version_0" / "checkpoints" / "best-epoch=00.ckpt"
    assert f"--ckpt_path best: {best}" in output and f"Restoring states from the checkpoint path at {best}" in output
    assert _test_oa(output) == _test_oa(fit_output)  # the very checkpoint the after-fit test evaluated
    assert _files(tmp / "d" / "version_0") == before  # the test run has its own folder
    assert (tmp / "d" / "version_1" / "reports" / "confusion_matrix.csv").is_file()
    for message in NOISE:
        assert message not in output, message


def test_a_run_with_another_root_leaves_the_first_runs_files_alone(tmp_path):
    from rsfusion.lightning_modules.commands.cli import main

    main(["fit", *_tiny(tmp_path / "scene", tmp_path / "a"), "--map_after_fit", "false"])
    first = _files(tmp_path / "a")
    main(["fit", *_tiny(tmp_path / "scene", tmp_path / "b"), "--map_after_fit", "false"])
    assert _files(tmp_path / "a") == first
    assert _files(tmp_path / "b").keys() == first.keys()  # same layout, other folder


def test_runs_in_one_root_get_their_own_folders_and_last_resumes_the_newest(tmp_path):
    from rsfusion.lightning_modules.commands.cli import main

    root = tmp_path / "runs"
    args = [*_tiny(tmp_path / "scene", root), "--test_after_fit", "false", "--map_after_fit", "false"]
    main(["fit", *args])
    main(["fit", *args])
    assert sorted(p.name for p in root.iterdir()) == ["version_0", "version_1"]
    steps = torch.load(root / "version_1" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    other = _files(root / "version_0")

    main(["fit", *args, "--trainer.max_epochs", "3", "--ckpt_path", "last"])
    assert sorted(p.name for p in root.iterdir()) == ["version_0", "version_1"]  # no new folder
    resumed = torch.load(root / "version_1" / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["epoch"] == 2 and resumed["global_step"] == 3 * steps  # continued from its own epoch 0
    assert _files(root / "version_0") == other
    epochs = [line.split(",") for line in (root / "version_1" / "metrics.csv").read_text().splitlines()]
    column = epochs[0].index("epoch")
    assert sorted({int(row[column]) for row in epochs[1:] if row[column]}) == [0, 1, 2]  # appended, not replaced


def test_ckpt_path_last_without_a_run_is_a_one_line_error_for_test(tmp_path, capsys):
    from rsfusion.lightning_modules.commands.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["test", *_tiny(tmp_path / "scene", tmp_path / "empty"), "--ckpt_path", "last"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --ckpt_path last: no checkpoint matches {tmp_path / 'empty'}/*/checkpoints/last.ckpt (set "
        "--trainer.default_root_dir to the run's root, or give the file)")


def test_sweep_trials_get_their_own_folders(tmp_path, monkeypatch):
    from rsfusion.lightning_modules.commands.cli import RSFusionCLI, cli_kwargs

    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")  # what `wandb agent` sets for each trial it starts
    folders = []
    for run_id in ("trial1", "trial2"):
        monkeypatch.setenv("WANDB_RUN_ID", run_id)
        cli = RSFusionCLI(**cli_kwargs(), args=_tiny(tmp_path / "scene", tmp_path / "sweep"), run=False)
        folders.append(cli.trainer.log_dir)
    assert folders == [str(tmp_path / "sweep" / "trial_trial1"), str(tmp_path / "sweep" / "trial_trial2")]


def test_runs_started_at_once_claim_distinct_versions(tmp_path):
    from rsfusion.lightning_modules.outputs.runs import RunLogger

    barrier, versions = threading.Barrier(8), []

    def start():
        logger = RunLogger(str(tmp_path))
        barrier.wait()
        versions.append(logger.version)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(versions) == list(range(8))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"version_{n}" for n in range(8)]


def test_predict_ckpt_path_last_takes_the_model_of_the_newest_run(first_run):
    """Without a config: model class, width and data options all come from the resolved ``last.ckpt``."""
    from rsfusion.lightning_modules.commands.cli import main

    tmp, _ = first_run
    scene = tmp / "scene" / "hsi_dsm-seed0"
    main(["predict", "--ckpt_path", "last", "--trainer.default_root_dir", str(tmp / "d"),
          "--trainer.enable_progress_bar", "false",
          "--data", f"{{modalities: {{hsi: {scene / 'hsi.tif'}, dsm: {scene / 'dsm.tif'}}}}}"])
    maps = sorted((tmp / "d").glob("version_*/predictions/classification_map.tif"))
    assert len(maps) == 2  # the fit's own map and this one, in a folder of its own
    import rasterio

    with rasterio.open(maps[0]) as fitted, rasterio.open(maps[1]) as predicted:
        assert (fitted.read(1) == predicted.read(1)).all()
