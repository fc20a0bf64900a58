"""Tests of the DAS²F network (rsfusion/lightning_modules/networks/das2f.py) against the spec's [C] facts."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rsfusion.kernels import selective_scan, selective_scan_ref
from rsfusion.lightning_modules.networks import das2f
from rsfusion.lightning_modules.networks.das2f import (
    Aalf,
    AttentionAwareFusion,
    CrossSpvm,
    DAS2FNet,
    Spvm,
    SpvmBlock,
    pixel_shuffle_tokens,
)

# A narrow network on a 4x4 MS / 16x16 PAN patch: same graph, small enough for CPU backward passes.
SMALL = dict(ms_patch_size=4, d_model=32, d_state=8, dt_rank=4, head_hidden=32)


def count(module):
    return sum(p.numel() for p in module.parameters())


def build(seed=0, **kwargs):
    torch.manual_seed(seed)
    return DAS2FNet(**{"num_classes": 5, **SMALL, **kwargs})


def inputs(batch=2, ms_patch=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 4, ms_patch, ms_patch, generator=generator),
            torch.rand(batch, 1, 4 * ms_patch, 4 * ms_patch, generator=generator))


# ---------------------------------------------------------------------------------------------
# Parameter counts (spec §2.6, exact [C])

@pytest.mark.parametrize("num_classes", [11, 7])
@pytest.mark.parametrize("variant, backbone", [("nanjing", 17_405_256), ("smallxian", 17_096_040)])
def test_parameter_count_matches_authors(variant, backbone, num_classes):
    with torch.device("meta"):
        net = DAS2FNet.from_variant(variant, num_classes)
    assert count(net) == backbone + 1025 * num_classes


def test_variants_are_the_authors_nets_and_an_unknown_one_is_refused():
    assert das2f.VARIANTS == {"nanjing": 2, "smallxian": 1}
    with torch.device("meta"):
        assert len(DAS2FNet.from_variant("nanjing", 3, stages=1, **SMALL).stages) == 1
    with pytest.raises(ValueError, match=r"variant must be one of \['nanjing', 'smallxian'\], got 'xian'"):
        DAS2FNet.from_variant("xian", 3)


def test_module_parameter_breakdown_matches_authors():
    with torch.device("meta"):
        net = DAS2FNet.from_variant("nanjing", 11)
        block = SpvmBlock(64, 24, 24)
    assert count(net.pan_lift) == 8
    assert count(net.ms_stem) == count(net.pan_stem) == 4288
    assert count(block) == 77_096 and count(block.spvm) == 43_880 and count(block.mlp) == 33_088
    assert count(net.stages[0].cross) == 153_936
    assert [count(f) for f in net.fusions] == [1088, 1088]
    assert count(net.head) == 16_778_240 + 1025 * 11
    params = block.spvm.params
    assert params.x_proj_weight.shape == (4, 72, 64) and params.dt_proj_weight.shape == (4, 64, 24)
    assert params.A_log.shape == (256, 24) and params.D.shape == (256,)


# ---------------------------------------------------------------------------------------------
# Documented equivalences

@pytest.mark.parametrize("factor", [4, 2])
def test_token_pixel_shuffle_matches_spec_index_rule(factor):
    """Channel c*f² + i*f + j of token (h, w) lands on pixel (f*h + i, f*w + j), channel c."""
    x = torch.randn(2, 3, 5, 4 * factor * factor)
    out = pixel_shuffle_tokens(x, factor)
    assert out.shape == (2, 3 * factor, 5 * factor, 4)
    expected = torch.empty_like(out)
    for h in range(3):
        for w in range(5):
            for c in range(4):
                for i in range(factor):
                    for j in range(factor):
                        expected[:, factor * h + i, factor * w + j, c] = \
                            x[:, h, w, c * factor * factor + i * factor + j]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_aalf_scalar_form_equals_authors_outer_product():
    torch.manual_seed(0)
    fusion = AttentionAwareFusion(16)
    a, b = torch.randn(3, 50, 16), torch.randn(3, 50, 16)
    gate = torch.sigmoid(fusion.gate(torch.cat([a, b], dim=-1)))
    outer = (a * gate).unsqueeze(-1) * b.unsqueeze(-2)  # (B, P, i, j) = A'_i B_j
    torch.testing.assert_close(fusion(a, b), outer.mean(dim=-2))


def test_aalf_block_rescales_common_map_with_shared_norm():
    torch.manual_seed(0)
    block = Aalf(16)
    nn.init.normal_(block.norm.weight)
    nn.init.normal_(block.norm.bias)
    d_ms, d_pan, f = torch.randn(2, 30, 16), torch.randn(2, 30, 16), torch.randn(2, 30, 16)
    ln = block.norm
    x = block.dominant.coefficient(ln(d_ms), ln(d_pan)) * ln(d_pan)
    expected = block.common.coefficient(ln(x), ln(f)) * ln(f)
    torch.testing.assert_close(block(d_ms, d_pan, f), expected)


def authors_ss2d(xs, delta, b, c, a, d, delta_bias, height, width):
    """The authors' SS2D: one scan per direction (readable reference scan), merged by index maps."""
    dim = xs.shape[1] // 4
    ys = []
    for k in range(4):
        ch = slice(k * dim, (k + 1) * dim)
        ys.append(selective_scan_ref(xs[:, ch], delta[:, ch], a[ch], b[:, k:k + 1], c[:, k:k + 1],
                                 D=d[ch], delta_bias=delta_bias[ch], delta_softplus=True))
    column_major = torch.arange(height * width).view(height, width).t().reshape(-1)
    out = ys[0] + ys[2].flip(-1)
    return out.index_add(2, column_major, ys[1] + ys[3].flip(-1))


def test_spvm_grouped_scan_equals_authors_per_direction_scans():
    torch.manual_seed(0)
    core = Spvm(32, 8, 4).eval()
    nn.init.normal_(core.params.patch_norm.running_mean)  # make BN non-trivial
    u = torch.randn(2, 4, 4, 32)
    params = core.params
    xs, delta, b, c = params.scan_inputs(u)
    # Scan input layout: direction k occupies channels [k*d, (k+1)*d), in the spec's order.
    x = params.patch_norm(params.patch_conv(F.silu(params.local_conv(
        F.pixel_shuffle(u.permute(0, 3, 1, 2), 4)))))
    rows, cols = x.flatten(2), x.transpose(2, 3).flatten(2)
    torch.testing.assert_close(xs, torch.cat([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1))
    y = authors_ss2d(xs, delta, b, c, *params.scan_constants(), 4, 4)
    expected = params.out_proj(core.out_norm(y.transpose(1, 2)).view(2, 4, 4, 32) * params.gate(u))
    torch.testing.assert_close(core(u), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("swap", [True, False])
def test_cross_branch_scans_with_other_modality_parameters(swap):
    torch.manual_seed(0)
    cross = CrossSpvm(32, 8, 4, swap=swap).eval()
    m, p = torch.randn(2, 4, 4, 32), torch.randn(2, 4, 4, 32)
    m_c, p_c = cross(m, p)
    mn, pn = cross.norm(m), cross.norm(p)
    xs_m, *ssm_m = cross.ms.scan_inputs(mn)
    xs_p, *ssm_p = cross.pan.scan_inputs(pn)
    const_m, const_p = cross.ms.scan_constants(), cross.pan.scan_constants()
    if swap:
        ssm_m, ssm_p, const_m, const_p = ssm_p, ssm_m, const_p, const_m
    for x, values, ssm, const, own, mlp, got in [
            (m, xs_m, ssm_m, const_m, cross.ms, cross.mlp_ms, m_c),
            (p, xs_p, ssm_p, const_p, cross.pan, cross.mlp_pan, p_c)]:
        y = authors_ss2d(values, *ssm, *const, 4, 4)
        x = x + own.output(cross.out_norm(y.transpose(1, 2)).view(2, 4, 4, 32), own.gate(cross.norm(x)))
        torch.testing.assert_close(got, x + mlp(cross.norm(x)), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Initialisation

def test_initialisation_xavier_and_mamba_init():
    net = build(d_model=64, d_state=24, dt_rank=24)
    head = net.head[0].weight
    bound = math.sqrt(6.0 / (head.shape[0] + head.shape[1]))
    assert head.abs().max() <= bound and head.abs().max() > 0.95 * bound
    in_proj = net.stages[0].self_ms.spvm.params.in_proj.weight  # xavier bound for 64x64
    assert 0.9 * math.sqrt(6 / 128) < in_proj.abs().max() <= math.sqrt(6 / 128)
    params = net.stages[1].cross.pan
    torch.testing.assert_close(params.A_log, torch.log(torch.arange(1.0, 25.0)).expand(256, 24))
    assert torch.equal(params.D, torch.ones(256))
    dt = F.softplus(params.dt_proj_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 1e-1 * (1 + 1e-4)
    assert params.x_proj_weight.abs().max() <= 0.125 and params.x_proj_weight.abs().max() > 0.12
    assert params.dt_proj_weight.abs().max() <= 24 ** -0.5
    assert params.dt_proj_weight.abs().max() > 0.95 * 24 ** -0.5


# ---------------------------------------------------------------------------------------------
# Forward / backward

@pytest.mark.parametrize("variant", ["nanjing", "smallxian"])
def test_paper_geometry_forward_shape(variant):
    torch.manual_seed(0)
    net = DAS2FNet.from_variant(variant, 11).eval()
    ms, pan = inputs(batch=2, ms_patch=16)
    with torch.no_grad():
        logits, features = net(ms, pan, return_features=True)
    assert logits.shape == (2, 11) and torch.isfinite(logits).all()
    assert features["fused"].shape == (2, 1024, 16)
    assert len(features["stages"]) == (2 if variant == "nanjing" else 1)
    assert all(f["ms_dominant"].shape == (2, 16, 16, 64) for f in features["stages"])


@pytest.mark.parametrize("stages", [2, 1])
def test_forward_backward_narrow(stages):
    net = build(stages=stages).train()
    ms, pan = inputs(batch=3)
    logits = net(ms, pan)
    assert logits.shape == (3, 5)
    logits.square().mean().backward()
    grads = {name: p.grad for name, p in net.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(grads[n].abs().sum() > 0 for n in grads if "A_log" in n or "dt_proj" in n or "x_proj" in n)


def test_deterministic_given_seed():
    ms, pan = inputs()
    torch.testing.assert_close(build(seed=3).eval()(ms, pan), build(seed=3).eval()(ms, pan),
                               rtol=0, atol=0)


def test_one_adam_step_lowers_loss():
    net = build().train()
    ms, pan = inputs(batch=8)
    target = torch.arange(8) % 5
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    before = F.cross_entropy(net(ms, pan), target)
    before.backward()
    optimiser.step()
    with torch.no_grad():
        after = F.cross_entropy(net(ms, pan), target)
    assert after < before - 1e-3


# ---------------------------------------------------------------------------------------------
# Cross branch and ablation switches

@pytest.mark.parametrize("swap", [True, False])
def test_pan_perturbation_reaches_ms_common_only_through_swap(swap):
    net = build(cross_swap=swap).eval()
    ms, pan = inputs()
    with torch.no_grad():
        _, base = net(ms, pan, return_features=True)
        _, moved = net(ms, pan + 0.5 * torch.randn_like(pan), return_features=True)
    first_base, first_moved = base["stages"][0], moved["stages"][0]
    assert torch.equal(first_base["ms_self"], first_moved["ms_self"])  # MS self branch sees MS only
    for stage_base, stage_moved in zip(base["stages"], moved["stages"]):
        assert not torch.equal(stage_base["pan_common"], stage_moved["pan_common"])
        ms_common_changed = (stage_base["ms_common"] - stage_moved["ms_common"]).abs().max()
        if swap:
            assert ms_common_changed > 1e-5  # small at init (dt ~ 1e-3..1e-1), far above fp noise
        else:  # no path from PAN to any MS feature
            assert ms_common_changed == 0
            assert torch.equal(stage_base["ms_self"], stage_moved["ms_self"])


def run_and_backprop(net, batch=2):
    ms, pan = inputs(batch=batch)
    logits, features = net.train()(ms, pan, return_features=True)
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    return logits.detach(), features


def test_ablation_cross_swap_off_same_weights_different_output():
    reference, ablated = build(), build(cross_swap=False)
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), ablated.parameters()))
    out_ref, _ = run_and_backprop(reference)
    out_abl, _ = run_and_backprop(ablated)
    assert (out_ref - out_abl).abs().max() > 1e-4


def test_ablation_dominant_features_off_drops_self_branches_and_fusion():
    reference, ablated = build(), build(dominant_features=False)
    removed = sum(count(s.self_ms) + count(s.self_pan) for s in reference.stages)
    assert count(ablated) == count(reference) - removed - count(reference.fusions)
    _, features = run_and_backprop(ablated)
    assert set(features["stages"][0]) == {"ms_common", "pan_common"}
    stage = features["stages"][-1]
    expected = pixel_shuffle_tokens((stage["ms_common"] + stage["pan_common"]) / 2, 2).flatten(1, 2)
    torch.testing.assert_close(features["fused"], expected)


def test_ablation_concat_fusion_replaces_aalf():
    reference, ablated = build(), build(fusion="concat")
    channels, maps = 8, 5  # d_model/4 channels; f plus two dominant maps per stage
    concat_params = 2 * channels * maps + channels * maps * channels + channels
    assert count(ablated) == count(reference) - count(reference.fusions) + concat_params
    out_ref, _ = run_and_backprop(reference)
    out_abl, _ = run_and_backprop(ablated)
    assert out_abl.shape == out_ref.shape and not torch.allclose(out_ref, out_abl)


def test_ablation_stages_one_vs_two():
    two, one = build(stages=2), build(stages=1)
    assert count(two) - count(one) == count(two.stages[1]) + count(two.fusions[1])
    _, features = run_and_backprop(one)
    assert len(features["stages"]) == 1


@pytest.mark.parametrize("kwargs, backbone", [
    (dict(stages=2, dominant_features=False), 17_405_256 - 4 * 77_096 - 2 * 1088),
    (dict(stages=1, dominant_features=False), 17_096_040 - 2 * 77_096 - 1088),
    (dict(stages=2, fusion="concat"), 17_405_256 - 2 * 1088 + 160 + 80 * 16 + 16),
    (dict(stages=1, fusion="concat"), 17_096_040 - 1088 + 96 + 48 * 16 + 16),
    (dict(stages=2, cross_swap=False), 17_405_256),
])
def test_ablation_parameter_counts_at_paper_width(kwargs, backbone):
    with torch.device("meta"):
        net = DAS2FNet(11, **kwargs)
    assert count(net) == backbone + 1025 * 11


# ---------------------------------------------------------------------------------------------
# Geometry

@pytest.mark.parametrize("ms_patch", [8, 12])
def test_other_patch_geometry_full_width(ms_patch):
    torch.manual_seed(0)
    net = DAS2FNet.from_variant("smallxian", 6, ms_patch_size=ms_patch, head_hidden=64)
    assert net.head[0].in_features == ms_patch * ms_patch * 64
    ms, pan = inputs(batch=2, ms_patch=ms_patch)
    logits = net(ms, pan)
    assert logits.shape == (2, 6)
    logits.sum().backward()
    assert torch.isfinite(net.ms_stem.proj.weight.grad).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(ms_patch_size=16, pan_patch_size=60), "pan_patch_size must be 4 x ms_patch_size = 64"),
    (dict(ms_patch_size=0), "ms_patch_size must be a positive int"),
    (dict(d_model=40), "d_model must be divisible by 16"),
    (dict(fusion="sum"), "fusion must be 'aalf' or 'concat'"),
    (dict(fusion="concat", dominant_features=False), "needs dominant_features=True"),
    (dict(stages=0), "stages must be a positive int"),
])
def test_bad_constructor_arguments_raise(kwargs, message):
    with torch.device("meta"), pytest.raises(ValueError, match=message):
        DAS2FNet(11, **kwargs)


@pytest.mark.parametrize("ms_shape, pan_shape, message", [
    ((2, 4, 4, 4), (2, 1, 15, 16), r"pan must be \(B, 1, 16, 16\)"),
    ((2, 4, 4, 4), (2, 1, 32, 32), r"pan must be \(B, 1, 16, 16\)"),
    ((2, 4, 8, 8), (2, 1, 32, 32), r"ms must be \(B, 4, 4, 4\) \(ms_patch_size=4\)"),
    ((2, 3, 4, 4), (2, 1, 16, 16), r"ms must be \(B, 4, 4, 4\)"),
    ((2, 4, 4, 4), (3, 1, 16, 16), "batch sizes differ"),
])
def test_bad_input_geometry_raises(ms_shape, pan_shape, message):
    net = build()
    with pytest.raises(ValueError, match=message):
        net(torch.rand(ms_shape), torch.rand(pan_shape))


def test_bf16_autocast_runs_scan_in_fp32(monkeypatch):
    seen = []

    def recording_scan(u, delta, A, B, C, **kwargs):
        seen.append(({t.dtype for t in (u, delta, A, B, C)}, torch.is_autocast_enabled("cpu")))
        return selective_scan(u, delta, A, B, C, **kwargs)

    monkeypatch.setattr(das2f, "selective_scan", recording_scan)
    net = build().eval()
    ms, pan = inputs(batch=4)
    with torch.no_grad():
        _, reference = net(ms, pan, return_features=True)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, features = net(ms, pan, return_features=True)
    assert logits.dtype == torch.bfloat16
    assert seen == [({torch.float32}, False)] * 6  # 2 stages x (2 self + 1 cross) scans
    # Stage features stay within bf16 rounding of fp32. (The fused map does not: AALF's
    # mixed-sign channel means amplify ~1 % input noise several-fold, in fp32 AALF as well.)
    for got, want in zip(features["stages"], reference["stages"]):
        for name in want:
            assert (got[name].float() - want[name]).norm() < 0.03 * want[name].norm(), name
    logits.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
