"""Checkpoints and config.yaml files written before lightning_modules/ was sorted into outputs/ and
commands/ still load: ``tests/data/pre_move/`` holds the last.ckpt and config.yaml of a tiny demo run
made by the code of that time (commit 4d9bd20); its config names ``rsfusion.lightning_modules.runs``."""
from __future__ import annotations

import csv
import importlib
import subprocess
import sys

import pytest

from rsfusion.lightning_modules.commands.cli import main
from tests.conftest import ROOT

PRE_MOVE = ROOT / "tests" / "data" / "pre_move"


@pytest.mark.parametrize("old, new", [("runs", "outputs.runs"), ("maps", "outputs.maps"), ("cli", "commands.cli"),
                                      ("callbacks", "outputs.callbacks"), ("evaluate", "commands.evaluate")])
def test_an_old_module_name_is_the_moved_module_itself(old, new):
    moved = importlib.import_module(f"rsfusion.lightning_modules.{old}")
    assert moved is importlib.import_module(f"rsfusion.lightning_modules.{new}")
    assert moved.__name__ == f"rsfusion.lightning_modules.{new}"


def test_a_config_and_checkpoint_written_before_the_move_test_and_predict(tmp_path, capsys):
    assert "rsfusion.lightning_modules.runs.RunLogger" in (PRE_MOVE / "config.yaml").read_text()
    common = ["--data.init_args.root", str(tmp_path / "data"), "--trainer.enable_progress_bar", "false"]
    # the old config.yaml names its run's save_dir (/tmp/oldrun): a new root is given as both
    main(["test", "--config", str(PRE_MOVE / "config.yaml"), "--ckpt_path", str(PRE_MOVE / "last.ckpt"),
          "--trainer.default_root_dir", str(tmp_path / "test"),
          "--trainer.logger.init_args.save_dir", str(tmp_path / "test"), *common])
    rows = list(csv.DictReader((tmp_path / "test" / "version_0" / "metrics.csv").open()))
    assert 0.0 <= float(next(r["test/OA"] for r in rows if r.get("test/OA"))) <= 1.0
    main(["predict", "--config", str(PRE_MOVE / "config.yaml"), "--ckpt_path", str(PRE_MOVE / "last.ckpt"),
          "--trainer.default_root_dir", str(tmp_path / "predict"),
          "--trainer.logger.init_args.save_dir", str(tmp_path / "predict"), *common])
    assert (tmp_path / "predict" / "version_0" / "predictions" / "classification_map.tif").is_file()


@pytest.mark.parametrize("module, expected", [("rsfusion.lightning_modules.sweeps", "usage: rsfusion sweep"),
                                              ("rsfusion.lightning_modules.bdgf_features", "rsfusion bank --config"),
                                              ("rsfusion.datamodules.make_scene", "usage: rsfusion make-scene")])
def test_the_old_python_m_spellings_still_run(module, expected):
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert expected in out.stdout
