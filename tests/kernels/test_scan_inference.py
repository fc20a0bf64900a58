"""``--inference_scan fast``: the forward-only, cache-blocked selective scan used during prediction.

Checked against the reference ``selective_scan_ref`` at the stated tolerance (float32 rounding of
exp2(delta A log2 e) instead of exp(delta A)), on shapes that exercise partial batch blocks and
chunks, groups, N below and above 4, and every optional input; then that it is used only where it
should be (inside the context, without gradient), and through ``rsfusion predict``.
"""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch

from rsfusion.kernels import scan_inference, selective_scan, selective_scan_ref
from rsfusion.kernels.scan_inference import fast_inference_scan, scan_core_inference
from rsfusion.kernels.scan_torch import scan_core_torch
from rsfusion.lightning_modules import DAS2F
from rsfusion.lightning_modules.commands.cli import main
from rsfusion.lightning_modules.outputs.inference import InferencePrecision
from tests.conftest import TINY_DAS2F as DAS2F_TINY
from tests.conftest import tiny_config

RTOL, ATOL = 1e-5, 1e-5  # the stated tolerance of the fast scan against the exact one


def scan_inputs(batch, dim, length, nstate, groups, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(u=torch.randn(batch, dim, length, generator=gen),
                delta=torch.randn(batch, dim, length, generator=gen) - 1.0,
                A=-torch.exp(torch.randn(dim, nstate, generator=gen)),
                B=torch.randn(batch, groups, nstate, length, generator=gen),
                C=torch.randn(batch, groups, nstate, length, generator=gen),
                D=torch.randn(dim, generator=gen), delta_bias=torch.rand(dim, generator=gen))


SHAPES = [  # (batch, dim, L, N, G): batch/L not multiples of the block/chunk, one step, N <= 4 and > 4
    (scan_inference.BATCH_BLOCK + 3, 8, 2 * scan_inference.CHUNK + 5, 24, 2),
    (2, 12, 1, 3, 3),
    (1, 16, scan_inference.CHUNK, 4, 1),
    (3, 8, 7, 16, 4),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("optional", [True, False])
def test_fast_scan_matches_the_reference(shape, optional):
    x = scan_inputs(*shape)
    if not optional:
        x.update(D=None, delta_bias=None, delta=0.1 * x["delta"].abs())  # without softplus delta must be > 0
    y, last = scan_core_inference(**x, delta_softplus=optional)
    y_ref, last_ref = selective_scan_ref(**x, delta_softplus=optional, return_last_state=True)
    assert y.shape == y_ref.shape and last.shape == last_ref.shape and y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(last, last_ref, rtol=RTOL, atol=ATOL)


def test_fast_scan_is_used_only_inside_the_context_and_without_gradient(monkeypatch):
    x = scan_inputs(5, 8, 11, 6, 2)
    exact = scan_core_torch(**x, delta_softplus=True)[0]
    calls = []
    monkeypatch.setattr("rsfusion.kernels.scan_inference.scan_core_inference",
                        lambda *a: calls.append(1) or scan_core_inference(*a))
    with torch.no_grad():
        outside = selective_scan(**x, delta_softplus=True, backend="torch")
    assert not calls
    torch.testing.assert_close(outside, exact, rtol=0, atol=0)  # the default path is untouched
    with fast_inference_scan(), torch.no_grad():
        fast = selective_scan(**x, delta_softplus=True, backend="torch")
    assert calls == [1]
    torch.testing.assert_close(fast, exact, rtol=RTOL, atol=ATOL)
    assert not (fast == exact).all()  # exp2 rounds differently: within tolerance, not bitwise
    u = x["u"].clone().requires_grad_()
    with fast_inference_scan():  # a call that needs a gradient keeps the exact autograd path
        y = selective_scan(**{**x, "u": u}, delta_softplus=True, backend="torch")
    y.sum().backward()
    assert calls == [1] and u.grad is not None
    torch.testing.assert_close(y.detach(), exact, rtol=0, atol=0)
    assert not scan_inference.fast_inference_scan_enabled()


def spy_on_the_fast_scan(monkeypatch):
    calls = []
    monkeypatch.setattr("rsfusion.kernels.scan_inference.scan_core_inference",
                        lambda *a: calls.append(a[0].shape) or scan_core_inference(*a))
    return calls


def test_callback_runs_das2f_with_the_fast_scan_only_during_predict(monkeypatch):
    calls = spy_on_the_fast_scan(monkeypatch)
    torch.manual_seed(0)
    model = DAS2F(in_channels={"ms": 4, "pan": 1}, num_classes=3, patch_size=4, **DAS2F_TINY).eval()
    batch = {"ms": torch.randn(9, 4, 4, 4), "pan": torch.randn(9, 1, 16, 16)}
    callback = InferencePrecision("32", scan="fast")
    with torch.no_grad():
        exact = model.predict_logits(batch)
        callback.on_predict_start(None, model)
        fast = model.predict_logits(batch)
        assert len(calls) == 6  # 2 stages x (2 self scans + 1 cross scan), all on the fast path
        callback.on_predict_end(None, model)
        again = model.predict_logits(batch)
    assert len(calls) == 6  # none after predict
    torch.testing.assert_close(fast, exact, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, exact, rtol=0, atol=0)
    with pytest.raises(ValueError, match="must be 'exact' or 'fast'"):
        InferencePrecision("32", scan="quick")


def test_predict_with_the_fast_scan_writes_the_exact_map(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, "das2f_synthetic", dict(scene_height=12, scene_width=12, train_per_class=4,
                                                           patch_size=4, batch_size=16), DAS2F_TINY,
                         max_epochs=1, limit_train_batches=2)
    main(["fit", "--config", str(config), "--test_after_fit", "false"])  # the exact map (version_0)
    ckpt = next((tmp_path / "runs").glob("version_0/checkpoints/best-*.ckpt"))
    calls = spy_on_the_fast_scan(monkeypatch)
    main(["predict", "--config", str(config), "--ckpt_path", str(ckpt), "--inference_scan", "fast"])
    assert calls  # the prediction ran the fast scan
    maps = []
    for version in ("version_0", "version_1"):
        with rasterio.open(tmp_path / "runs" / version / "predictions" / "classification_map.tif") as src:
            maps.append(src.read(1))
    assert maps[0].min() >= 1
    np.testing.assert_array_equal(maps[1], maps[0])
