"""The console scripts end to end on a tiny synthetic scene: fit (+ test + map), test, predict."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

from tests.conftest import ROOT, tiny_config


def _script(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.skip(f"console script {name!r} not installed (pip install -e .)")
    return found


def _run(args, cwd):
    # one thread: the map/metric comparisons between processes below are bit for bit
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name", ["lightning", "rsfusion"])
def test_console_scripts_reach_the_cli(name):
    out = _run([_script(name), "fit", "--help"], ROOT)
    assert out.returncode == 0, out.stderr
    assert "--test_after_fit" in out.stdout and "--data" in out.stdout


SUBCOMMANDS = {"fit": "--test_after_fit", "validate": "--ckpt_path", "test": "--ckpt_path", "predict": "--map.",
               "export": "--format", "evaluate": "--labels", "compare": "--seeds", "sweep": "sweep",
               "bank": "rsfusion bank --config", "make-scene": "--seed"}


@pytest.mark.parametrize("command, option", SUBCOMMANDS.items())
def test_every_rsfusion_command_has_its_help(command, option, capsys, monkeypatch):
    # In this process: the console scripts' own start-up is tested above and below (each run of the
    # script spends ~8 s importing lightning, ten of them more than a minute of the suite).
    from rsfusion.lightning_modules.commands.cli import main

    monkeypatch.chdir(ROOT)
    try:
        main([command, "--help"])
        code = 0  # a help that returns: the console script exits 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    assert code in (0, None), out.err
    assert option in out.out


def test_the_top_level_help_lists_every_command():
    out = _run([_script("rsfusion"), "--help"], ROOT)
    assert out.returncode == 0, out.stderr
    listed = " ".join(out.stdout.split())  # argparse wraps the epilog
    assert all(f"'rsfusion {name}'" in listed for name in SUBCOMMANDS if name not in ("fit", "validate", "test",
                                                                                       "predict"))


def _tiny_config(tmp_path: Path) -> Path:
    return tiny_config(tmp_path, "demo", dict(scene_height=32, scene_width=40, train_per_class=12, patch_size=5,
                                              batch_size=32), dict(width=8), max_epochs=2)


def test_fit_tests_and_writes_a_georeferenced_map_then_predict_from_checkpoint(tmp_path):
    config = _tiny_config(tmp_path)
    fit = _run([_script("lightning"), "fit", "--config", str(config)], tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "test/OA" in fit.stdout and "test/kappa" in fit.stdout and "test/acc_Trees" in fit.stdout
    run = tmp_path / "runs" / "version_0"
    metrics = list(csv.DictReader((run / "metrics.csv").open()))
    test_oa = [float(r["test/OA"]) for r in metrics if r.get("test/OA")]
    assert len(test_oa) == 1 and 0 <= test_oa[0] <= 1
    with rasterio.open(run / "predictions" / "classification_map.tif") as src:
        classes = src.read(1)
        with rasterio.open(tmp_path / "scene" / "hsi_dsm-seed0" / "hsi.tif") as hsi:
            assert src.crs == hsi.crs and src.transform == hsi.transform and src.shape == hsi.shape
        assert src.colormap(1)[1][:3] != (0, 0, 0)
    assert classes.min() >= 1 and classes.max() <= 6  # every valid pixel classified, 1..K
    assert (run / "predictions" / "classification_map.png").stat().st_size > 1000

    ckpt = next((tmp_path / "runs" / "version_0" / "checkpoints").glob("best-*.ckpt"))
    from rsfusion.lightning_modules import TwoBranchCNN

    restored = TwoBranchCNN.load_from_checkpoint(ckpt)  # outside the CLI too
    assert restored.in_channels == {"hsi": 48, "dsm": 1} and restored.class_names[0] == "Trees"
    assert restored.patch_size == 5
    test = _run([_script("rsfusion"), "test", "--config", str(config), "--ckpt_path", str(ckpt)], tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    assert f"{test_oa[0]:.6f}"[:6] in test.stdout  # the same best checkpoint gives the same OA

    predict = _run([_script("rsfusion"), "predict", "--config", str(config), "--ckpt_path", str(ckpt)], tmp_path)
    assert predict.returncode == 0, predict.stderr[-3000:]
    again = next((tmp_path / "runs").glob("version_*/predictions/classification_map.tif"))
    maps = sorted((tmp_path / "runs").glob("version_*/predictions/classification_map.tif"))
    assert len(maps) == 2
    with rasterio.open(maps[-1]) as src:
        np.testing.assert_array_equal(src.read(1), classes)
    assert again.exists()


def test_bad_raster_is_one_line_error_not_a_traceback(tmp_path):
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["data"] = {"class_path": "rsfusion.datamodules.RasterDataModule",
                      "init_args": {"modalities": {"hsi": str(tmp_path / "missing.tif")},
                                    "train_labels": str(tmp_path / "t.tif"), "test_labels": str(tmp_path / "t.tif")}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    out = _run([_script("lightning"), "fit", "--config", str(path)], tmp_path)
    assert out.returncode == 2
    assert "missing.tif: file not found" in out.stderr and "Traceback" not in out.stderr
