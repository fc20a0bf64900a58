"""What a study measures of a model: parameters split by trainability, FLOPs with the scan counted."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from rsfusion.lightning_modules.das2f import DAS2F
from rsfusion.lightning_modules.outputs.efficiency import flops_per_sample, one_sample, parameter_counts
from tests.conftest import TINY_DAS2F


def _model_and_batch():
    torch.manual_seed(0)
    model = DAS2F(in_channels={"ms": 4, "pan": 1}, num_classes=5, patch_size=4, **TINY_DAS2F)
    batch = {"ms": torch.randn(3, 4, 4, 4), "pan": torch.randn(3, 1, 16, 16), "label": torch.tensor([0, 1, 4])}
    return model, batch


def test_a_mamba_model_is_counted_with_its_scans():
    model, batch = _model_and_batch()
    counted = flops_per_sample(model, batch)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as plain:
        model(one_sample(batch))
    scan = torch.ops.rsfusion.selective_scan
    assert scan not in plain.get_flop_counts()["Global"]  # the plain counter never sees a scan
    assert counted > plain.get_total_flops() > 0  # with the registration the scans are added on top
    model.train()
    assert flops_per_sample(model, batch) == counted and model.training  # eval inside, the mode restored


def test_parameters_split_by_trainability():
    model, _ = _model_and_batch()
    total = sum(p.numel() for p in model.parameters())
    frozen = list(model.parameters())[0]
    frozen.requires_grad_(False)
    assert parameter_counts(model) == {"trainable_params": total - frozen.numel(), "frozen_params": frozen.numel()}
