"""The DAS2F LightningModule: recipe defaults, linking with the MS/PAN DataModule, a CLI smoke run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rsfusion.datamodules.errors import InputError
from rsfusion.lightning_modules import DAS2F
from tests.conftest import TINY_DAS2F as TINY
from tests.conftest import tiny_config


def test_recipe_defaults_and_step_decay():
    model = DAS2F(in_channels={"ms": 4, "pan": 1}, num_classes=5, patch_size=4, **TINY)
    assert (model.hparams.lr, model.hparams.weight_decay, model.hparams.optimizer) == (1.93e-4, 5e-4, "adam")
    model.trainer = None
    optimizers = model.configure_optimizers()
    opt, schedule = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.Adam) and all(g["weight_decay"] == 5e-4 for g in opt.param_groups)
    for _ in range(10):
        opt.step()
        schedule.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.93e-4 * 0.9995 ** 10)
    batch = {"ms": torch.randn(3, 4, 4, 4), "pan": torch.randn(3, 1, 16, 16), "label": torch.tensor([0, 1, 4])}
    assert model(batch).shape == (3, 5)
    assert len(model.net.stages) == 2 and len(DAS2F(in_channels={"ms": 4, "pan": 1}, num_classes=5, patch_size=4,
                                                   variant="smallxian", **TINY).net.stages) == 1


def test_unknown_modality_names_are_a_clear_error():
    with pytest.raises(InputError, match=r"modalities \['pan'\] not in the data's \['ms', 'p'\]"):
        DAS2F(in_channels={"ms": 4, "p": 1}, num_classes=3, **TINY)


def test_fit_smoke_run_through_the_console_script(tmp_path):
    path = tiny_config(tmp_path, "das2f_synthetic", dict(scene_height=24, scene_width=24, train_per_class=8,
                                                         patch_size=4, batch_size=16), TINY,
                       max_epochs=1, limit_train_batches=3)
    script = Path(sys.executable).parent / "rsfusion"
    out = subprocess.run([str(script), "fit", "--config", str(path)], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test/OA" in out.stdout
    assert next((tmp_path / "runs").glob("version_0/predictions/classification_map.tif")).stat().st_size > 0


def test_unknown_scan_backend_is_a_one_line_input_error():
    with pytest.raises(InputError, match=r"^model.init_args.scan_backend must be one of \('auto', 'cuda', 'triton', "
                                         r"'torch'\), got 'gpu'$"):
        DAS2F(in_channels={"ms": 4, "pan": 1}, num_classes=3, patch_size=4, scan_backend="gpu", **TINY)
