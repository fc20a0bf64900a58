"""The suite's callbacks: added by the CLI once each, and doing their job in a Trainer built in Python."""
from __future__ import annotations

import csv

import lightning as L
import pytest
import rasterio
import torch
from lightning.pytorch.loggers import CSVLogger

from rsfusion.datamodules import SyntheticDataModule
from rsfusion.lightning_modules import (
    ClassificationMapWriter,
    LeakageReport,
    RNGStateCapture,
    TestReport,
    TwoBranchCNN,
    default_callbacks,
)
from rsfusion.lightning_modules.commands.cli import RSFusionCLI, cli_kwargs
from tests.conftest import CONFIGS

SCENE = dict(scene_height=24, scene_width=24, train_per_class=4, patch_size=5, batch_size=16)


def _cli(tmp_path, *extra: str) -> RSFusionCLI:
    data = [f"--data.init_args.{k}={v}" for k, v in {"root": tmp_path / "scene", **SCENE}.items()]
    return RSFusionCLI(**cli_kwargs(), run=False, args=["--config", str(CONFIGS / "demo.yaml"), *data,
                                                         f"--trainer.default_root_dir={tmp_path}", *extra])


def test_the_cli_registers_each_callback_once(tmp_path):
    kinds = (RNGStateCapture, LeakageReport, TestReport, ClassificationMapWriter)
    callbacks = _cli(tmp_path).trainer.callbacks
    assert [sum(isinstance(cb, kind) for cb in callbacks) for kind in kinds] == [1, 1, 1, 1]
    # one given in the config is kept, not doubled
    given = '[{"class_path": "rsfusion.lightning_modules.TestReport"}]'
    callbacks = _cli(tmp_path, f"--trainer.callbacks+={given}").trainer.callbacks
    assert sum(isinstance(cb, TestReport) for cb in callbacks) == 1


def test_default_callbacks_in_a_python_trainer_report_resume_and_map(tmp_path):
    L.seed_everything(0)
    dm = SyntheticDataModule(root=str(tmp_path / "scene"), **SCENE)
    model = TwoBranchCNN(in_channels=dm.in_channels, num_classes=dm.num_classes, class_names=dm.class_names,
                         patch_size=dm.patch_size, width=4, dropout=0.3)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=CSVLogger(tmp_path), default_root_dir=tmp_path,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=default_callbacks())
    trainer.fit(model, dm)
    log_dir = tmp_path / "lightning_logs" / "version_0"

    # RNG capture: the checkpoint holds the states of this moment, and resuming from it restores them
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    states = torch.load(tmp_path / "a.ckpt", weights_only=True)["rng_states"]
    assert torch.equal(states["torch"], torch.get_rng_state())
    after_resume = []
    for seed in (123, 456):  # whatever the process drew before, resuming continues the checkpoint's stream
        torch.manual_seed(seed)
        resumed = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=default_callbacks())
        resumed.fit(model, dm, ckpt_path=tmp_path / "a.ckpt")  # already at max_steps: only the restore happens
        after_resume.append(torch.rand(3))
    assert torch.equal(after_resume[0], after_resume[1])

    trainer.test(model, dm, verbose=False)
    rows = list(csv.reader((log_dir / "reports" / "confusion_matrix.csv").open()))
    assert rows[0][1:] == dm.class_names
    assert sum(int(v) for row in rows[1:] for v in row[1:]) == int((dm.label_rasters["test"] > 0).sum())

    metrics = list(csv.DictReader((log_dir / "metrics.csv").open()))
    key = "data/test_pixels_in_train_patches"
    leakage = [float(r[key]) for r in metrics if r.get(key)]
    assert leakage == [float(dm.leakage)]

    out = model.predict_step(next(iter(dm.test_dataloader())), 0)
    assert set(out) == {"pred"}  # where the samples lie, the writer reads from the batch itself
    trainer.predict(model, dm, return_predictions=False)
    with rasterio.open(log_dir / "predictions" / "classification_map.tif") as src:
        classes = src.read(1)
    assert classes.shape == (24, 24) and classes.min() >= 1 and classes.max() <= 6


@pytest.mark.parametrize("kind", [RNGStateCapture, LeakageReport, TestReport, ClassificationMapWriter])
def test_each_default_callback_is_a_lightning_callback(kind):
    assert isinstance(kind(), L.Callback)
    assert sum(isinstance(cb, kind) for cb in default_callbacks()) == 1
    assert not any(isinstance(cb, ClassificationMapWriter) for cb in default_callbacks(map_writer=False))
