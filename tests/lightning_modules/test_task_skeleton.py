"""FusionClassifier's skeleton: one declaration of the samplings a model takes, and torch's schedulers
giving the learning rates of the formula the suite documents."""
from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch

from rsfusion.datamodules import SyntheticDataModule
from rsfusion.datamodules.errors import InputError
from rsfusion.lightning_modules import BDGF, DAS2F, BDGFPretrain, M3amba, TwoBranchCNN
from rsfusion.lightning_modules.base import FusionClassifier


def test_each_model_declares_its_samplings():
    declared = {cls.__name__: set(cls.samplings) for cls in (TwoBranchCNN, M3amba, DAS2F, BDGF, BDGFPretrain)}
    assert declared == {"TwoBranchCNN": {"pixel", "tile"}, "M3amba": {"tile"}, "DAS2F": {"pixel"},
                        "BDGF": {"pixel"}, "BDGFPretrain": {"pixel", "tile"}}


def test_a_sampling_the_model_does_not_take_is_one_line():
    with pytest.raises(InputError, match=r"^DAS2F needs data.sampling='pixel'$"):
        DAS2F(in_channels={"ms": 4, "pan": 1}, num_classes=3, dense=True)
    assert TwoBranchCNN(in_channels={"a": 2}, num_classes=3, dense=True).sampling == "tile"
    assert TwoBranchCNN(in_channels={"a": 2}, num_classes=3, dense=False).sampling == "pixel"


def test_a_datamodule_sampling_other_than_the_models_is_refused_at_setup(tmp_path):
    dm = SyntheticDataModule(root=str(tmp_path), scene_height=24, scene_width=24, train_per_class=4, patch_size=5)
    model = TwoBranchCNN(in_channels=dm.in_channels, num_classes=dm.num_classes, dense=True, width=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(InputError, match=r"^TwoBranchCNN needs data.sampling='tile', the DataModule uses 'pixel'$"):
        trainer.fit(model, dm)


class Linear(FusionClassifier):
    def __init__(self, **kwargs):
        super().__init__(in_channels={"x": 3}, num_classes=2, **kwargs)
        self.net = torch.nn.Linear(3, 2)

    def forward(self, batch):
        return self.net(batch["x"])


class RecordLR(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([group["lr"] for group in trainer.optimizers[0].param_groups])


def old_factor(step: int, scheduler: str, total: int, warmup: int, gamma: float) -> float:
    """The LambdaLR factors of rsfusion before torch's schedulers replaced them."""
    if scheduler == "step_decay":
        return gamma ** step
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("scheduler, warmup", [("cosine", 0), ("cosine", 1), ("cosine", 2), ("cosine", 5),
                                               ("step_decay", 0)])
def test_learning_rate_at_every_step_equals_the_formula(scheduler, warmup):
    samples = [{"x": torch.randn(3), "label": torch.tensor(i % 2)} for i in range(24)]
    loader = torch.utils.data.DataLoader(samples, batch_size=4)  # 6 steps per epoch
    model = Linear(lr=0.01, scheduler=scheduler, warmup_steps=warmup, step_decay_gamma=0.8, optimizer="sgd")
    record = RecordLR()
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[record])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", module=r"torch\.optim")  # no deprecation or ordering warning
        trainer.fit(model, loader)
    total = 18
    expected = [0.01 * old_factor(step, scheduler, total, warmup, 0.8) for step in range(total)]
    assert len(record.lrs) == total
    for step, lrs in enumerate(record.lrs):
        assert lrs == pytest.approx([expected[step]] * 2, rel=1e-9, abs=1e-15), step
