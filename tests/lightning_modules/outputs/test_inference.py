"""``--inference_precision bf16``: convolutions in bfloat16 during predict only, maps within the stated
tolerance of float32 maps for a trained model."""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch

from rsfusion.lightning_modules import DAS2F, TwoBranchCNN
from rsfusion.lightning_modules.commands.cli import main
from rsfusion.lightning_modules.outputs.inference import InferencePrecision
from tests.conftest import TINY_DAS2F as DAS2F_TINY
from tests.conftest import tiny_config

MAX_DIFFERENT_PIXELS = 0.01  # the stated tolerance: bf16 maps differ from float32 maps on < 1 % of pixels


def test_bf16_runs_only_during_predict_and_returns_float32_scores():
    torch.manual_seed(0)
    model = TwoBranchCNN(in_channels={"hsi": 6, "dsm": 1}, num_classes=4, width=8, patch_size=5).eval()
    batch = {"hsi": torch.randn(3, 6, 5, 5), "dsm": torch.randn(3, 1, 5, 5)}
    seen = []
    model.net.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    callback = InferencePrecision("bf16")
    with torch.no_grad():
        reference = model.predict_logits(batch)
        callback.on_predict_start(None, model)
        fast = model.predict_logits(batch)
        callback.on_predict_end(None, model)
        again = model.predict_logits(batch)
    assert seen == [torch.float32, torch.bfloat16, torch.float32]
    assert fast.dtype == torch.float32 and "predict_logits" not in vars(model)
    torch.testing.assert_close(again, reference, rtol=0, atol=0)
    torch.testing.assert_close(fast, reference, rtol=0, atol=0.1)  # bf16 has 8 mantissa bits
    with pytest.raises(ValueError, match="must be '32' or 'bf16'"):
        InferencePrecision("fp16")


def test_the_scan_stays_float32_under_bf16():
    from rsfusion.kernels import dispatch

    calls, inputs = [], []
    original, backend = dispatch.scan_core_torch, dispatch._torch_backend

    def spy(u, *args, **kwargs):
        calls.append(u.dtype)
        return original(u, *args, **kwargs)

    def backend_spy(u, *args, **kwargs):
        inputs.append(u.dtype)
        return backend(u, *args, **kwargs)

    torch.manual_seed(0)
    model = DAS2F(in_channels={"ms": 4, "pan": 1}, num_classes=3, patch_size=4, **DAS2F_TINY).eval()
    batch = {"ms": torch.randn(2, 4, 4, 4), "pan": torch.randn(2, 1, 16, 16)}
    head = []
    model.net.head[0].register_forward_hook(lambda m, i, o: head.append(o.dtype))
    callback = InferencePrecision("bf16")
    dispatch.scan_core_torch, dispatch._torch_backend = spy, backend_spy
    try:
        callback.on_predict_start(None, model)
        with torch.no_grad():
            model.predict_logits(batch)
    finally:
        dispatch.scan_core_torch, dispatch._torch_backend = original, backend
        callback.on_predict_end(None, model)
    assert head == [torch.bfloat16]  # the linear layers ran in bf16 ...
    assert inputs and calls and set(calls) == {torch.float32}  # ... the recurrence in float32


@pytest.mark.slow
def test_bf16_map_of_a_trained_model_is_within_tolerance_of_the_float32_map(tmp_path):
    config = tiny_config(tmp_path, "demo", dict(scene_height=32, scene_width=40, train_per_class=12, patch_size=5,
                                                batch_size=32), dict(width=8), max_epochs=3)
    main(["fit", "--config", str(config), "--test_after_fit", "false"])  # float32 map of the best checkpoint
    ckpt = next((tmp_path / "runs").glob("version_*/checkpoints/best-*.ckpt"))
    main(["predict", "--config", str(config), "--ckpt_path", str(ckpt), "--inference_precision", "bf16"])
    maps = []
    for version in ("version_0", "version_1"):
        with rasterio.open(tmp_path / "runs" / version / "predictions" / "classification_map.tif") as src:
            maps.append(src.read(1))
    assert maps[0].min() >= 1 and maps[1].min() >= 1
    assert np.mean(maps[0] != maps[1]) < MAX_DIFFERENT_PIXELS
