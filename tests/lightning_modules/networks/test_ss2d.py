"""SS2D / VSS block: shapes, gradients, VMamba initialisation, parameter counts, and equality with a
direct computation of the four scan directions (four separate reference scans)."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from rsfusion.kernels.reference import selective_scan_ref
from rsfusion.lightning_modules.networks.layers import DropPath
from rsfusion.lightning_modules.networks.ss2d import SS2D, VSSBlock


def _direct_ss2d(module, x):
    """SS2D written out per direction: explicit flips/transposes and one ungrouped scan each."""
    batch, height, width, _ = x.shape
    d, ssm = module.d_inner, module.ssm
    u, gate = module.in_proj(x).chunk(2, dim=-1)
    u = F.silu(module.conv2d(u.permute(0, 3, 1, 2)))  # (B, D, H, W)
    row_major = u.reshape(batch, d, height * width)
    col_major = u.transpose(2, 3).reshape(batch, d, height * width)
    sequences = [row_major, col_major, row_major.flip(-1), col_major.flip(-1)]
    A = -torch.exp(ssm.A_logs)
    outputs = []
    for k, seq in enumerate(sequences):
        x_dbl = ssm.x_proj_weight[k] @ seq  # (B, R + 2N, L)
        dt, B, C = torch.split(x_dbl, [ssm.dt_rank, ssm.d_state, ssm.d_state], dim=1)
        channels = slice(k * d, (k + 1) * d)
        outputs.append(selective_scan_ref(
            seq, ssm.dt_projs_weight[k] @ dt, A[channels], B, C, ssm.Ds[channels],
            delta_bias=ssm.dt_projs_bias[k], delta_softplus=True))
    rows = outputs[0] + outputs[2].flip(-1)
    cols = (outputs[1] + outputs[3].flip(-1)).reshape(batch, d, width, height).transpose(2, 3)
    merged = rows.reshape(batch, d, height, width) + cols
    y = module.out_norm(merged.permute(0, 2, 3, 1))
    return module.out_proj(y * F.silu(gate))


def test_ss2d_equals_four_separate_direction_scans():
    torch.manual_seed(0)
    module = SS2D(d_model=6, d_state=4, ssm_ratio=2.0, dt_rank=3)
    x = torch.randn(2, 3, 5, 6)  # H != W catches transposition mistakes
    expected = _direct_ss2d(module, x)
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-6)
    assert expected.abs().max() > 1e-3  # not a trivially zero comparison


def test_ss2d_shape_and_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    module = SS2D(d_model=8, d_state=4, ssm_ratio=1.5)
    x = torch.randn(2, 4, 5, 8, requires_grad=True)
    out = module(x)
    assert out.shape == (2, 4, 5, 8)
    out.square().sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_vss_block_shape_gradient_and_residual():
    torch.manual_seed(0)
    block = VSSBlock(8, d_state=4).eval()
    x = torch.randn(1, 4, 4, 8, requires_grad=True)
    out = block(x)
    assert out.shape == x.shape
    out.sum().backward()
    for name, param in block.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    with torch.no_grad():  # zeroing both branch outputs leaves the identity
        block.op.out_proj.weight.zero_()
        block.mlp.fc2.weight.zero_()
        block.mlp.fc2.bias.zero_()
        torch.testing.assert_close(block(x), x)


def test_parameter_counts_match_the_authors_code():
    with torch.device("meta"):
        block = VSSBlock(384, d_state=16, ssm_ratio=2.0, dt_rank="auto", d_conv=3, mlp_ratio=4.0)
    assert sum(p.numel() for p in block.parameters()) == 2_378_112
    assert sum(p.numel() for p in block.op.parameters()) == 1_195_008
    assert block.op.ssm.dt_rank == 24 and block.op.d_inner == 768
    assert tuple(block.op.ssm.x_proj_weight.shape) == (4, 56, 768)
    assert tuple(block.op.ssm.A_logs.shape) == (3072, 16)


def test_vmamba_initialisation():
    torch.manual_seed(0)
    ssm = SS2D(d_model=32, d_state=8, ssm_ratio=2.0).ssm  # dt_rank auto = 2
    assert ssm.dt_rank == 2
    expected_a_logs = torch.log(torch.arange(1, 9, dtype=torch.float32)).expand(4 * 64, 8)
    torch.testing.assert_close(ssm.A_logs.detach(), expected_a_logs)
    torch.testing.assert_close(ssm.Ds.detach(), torch.ones(4 * 64))
    dt = F.softplus(ssm.dt_projs_bias.detach())
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    assert ssm.dt_projs_weight.abs().max() <= 2 ** -0.5
    assert ssm.x_proj_weight.abs().max() <= 1 / math.sqrt(64)
    assert ssm.A_logs._no_weight_decay and ssm.Ds._no_weight_decay


@pytest.mark.parametrize("kwargs, name", [
    ({"d_model": 0}, "d_model"),
    ({"d_model": 8, "d_state": 0}, "d_state"),
    ({"d_model": 8, "ssm_ratio": 0}, "ssm_ratio"),
    ({"d_model": 8, "dt_rank": "big"}, "dt_rank"),
    ({"d_model": 8, "d_conv": 2}, "d_conv"),
    ({"d_model": 8, "dropout": 1.0}, "dropout"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SS2D(**kwargs)


def test_wrong_input_layout_is_rejected():
    with pytest.raises(ValueError, match=r"x must be \(B, H, W, 8\)"):
        SS2D(8)(torch.randn(1, 8, 4, 4))


def test_drop_path_is_identity_in_eval_and_drops_whole_samples_in_train():
    torch.manual_seed(0)
    drop = DropPath(0.5)
    x = torch.ones(64, 3, 2)
    assert torch.equal(drop.eval()(x), x)
    out = drop.train()(x)
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)
    assert 0 < (per_sample[:, 0] == 0).sum() < 64


# ---------------------------------------------------------------------------------------------
# scan_backend: the model's choice reaches rsfusion.kernels.selective_scan


@pytest.mark.parametrize("scan_backend", ["torch", "auto"])
def test_scan_backend_reaches_selective_scan(scan_backend, scan_backend_calls, monkeypatch):
    monkeypatch.delenv("RSFUSION_SCAN_BACKEND", raising=False)
    torch.manual_seed(0)
    block = VSSBlock(8, d_state=4, scan_backend=scan_backend)
    x = torch.randn(2, 3, 5, 8)
    out = block(x)
    assert scan_backend_calls == [(scan_backend, "torch")]
    torch.manual_seed(0)
    assert torch.equal(out, VSSBlock(8, d_state=4)(x))  # the backend changes the kernel, not the maths (on CPU)


def test_unknown_scan_backend_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"^scan_backend must be one of \('auto', 'cuda', 'triton', 'torch'\), "
                                         r"got 'fast'$"):
        SS2D(8, scan_backend="fast")


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="Triton can run here")
def test_triton_scan_backend_without_gpu_or_interpreter_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"^scan_backend 'triton' needs a CUDA device and this machine has none "
                                         r"\(on CPU, Triton runs only in its interpreter: TRITON_INTERPRET=1") as err:
        SS2D(8, scan_backend="triton")
    assert "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_scan_backend_without_gpu_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"^scan_backend 'cuda' \(mamba-ssm's kernel\) needs a CUDA device"):
        SS2D(8, scan_backend="cuda")
