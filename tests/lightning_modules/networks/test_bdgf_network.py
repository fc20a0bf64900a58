"""BDGF stage 3 networks: guided CNN / Mamba / Transformer branches, BDGFNet, mutual-learning losses."""
import pytest
import torch
import torch.nn.functional as F

from rsfusion.lightning_modules.losses import (
    bdgf_loss,
    dml_kl_loss,
    entropy_gap_loss,
    feature_similarity_loss,
    warmup_weight,
)
from rsfusion.lightning_modules.networks.bdgf import (
    BDGFNet,
    CNNBranch,
    MambaBranch,
    TransformerBranch,
    channel_shuffle,
)
from rsfusion.lightning_modules.networks.bdgf_diffusion import (
    MultimodalDenoiserUNet,
)

MODS = {"hsi": 6, "sar": 2}

@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny ops run ~100x faster single-threaded on shared, oversubscribed CI cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
K, P, D = 3, 5, 16


def tiny_unet(**kwargs):
    cfg = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
               attention_heads=2, stem_channels=4, norm_groups=4, dropout=0.0)
    cfg.update(kwargs)
    return MultimodalDenoiserUNet(MODS, **cfg)


def patches(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(batch, c, P, P, generator=g) for n, c in MODS.items()}


def guides(batch=4, seed=1, channels=(8, 12, 10)):
    g = torch.Generator().manual_seed(seed)
    return {b: torch.randn(batch, c, P, P, generator=g) for b, c in zip(("cnn", "mamba", "transformer"), channels)}


def tiny_net(**kwargs):
    cfg = dict(guide_channels={"cnn": 8, "mamba": 12, "transformer": 10}, patch_size=P, dim=D, proj_dim=8,
               mamba_kwargs=dict(d_state=4), transformer_kwargs=dict(heads=2))
    cfg.update(kwargs)
    return BDGFNet(MODS, K, **cfg)


@pytest.mark.parametrize("branch_cls, channels, kwargs", [
    (CNNBranch, 8, {}),
    (MambaBranch, 12, {"d_state": 4}),
    (TransformerBranch, 10, {"patch_size": P, "heads": 2}),
])
def test_guidance_changes_branch_output(branch_cls, channels, kwargs):
    torch.manual_seed(0)
    branch = branch_cls(MODS, K, guide_channels=channels, dim=D, **kwargs).eval()
    x = patches()
    g1, g2 = torch.randn(4, channels, P, P), torch.randn(4, channels, P, P)
    with torch.no_grad():
        logits1, z1 = branch(x, g1)
        logits2, z2 = branch(x, g2)
        again, _ = branch(x, g1)
    assert logits1.shape == (4, K) and z1.shape == (4, D)
    torch.testing.assert_close(again, logits1)
    assert (z1 - z2).abs().max() > 1e-3 and (logits1 - logits2).abs().max() > 1e-4
    with pytest.raises(ValueError, match="guided"):
        branch(x, None)

    unguided = branch_cls(MODS, K, guide_channels=None, dim=D, **kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(unguided(x, g1)[0], unguided(x, g2)[0])


def test_channel_shuffle_is_a_permutation():
    x = torch.arange(8.0).view(1, 8, 1, 1)
    assert channel_shuffle(x, 4).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_bdgf_net_outputs_and_ensemble():
    torch.manual_seed(0)
    net = tiny_net().eval()
    out = net(patches(), guides())
    assert net.branch_names == ["cnn", "mamba", "transformer"]
    for b in net.branch_names:
        assert out.logits[b].shape == (4, K) and out.features[b].shape == (4, D)
        assert out.projections[b].shape == (4, 8)
        torch.testing.assert_close(out.projections[b].norm(dim=1), torch.ones(4))
    probs = net.predict_proba(patches(), guides())
    expected = sum(torch.softmax(z, -1) for z in out.logits.values()) / 3
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(4))

    with torch.device("meta"):
        default = BDGFNet({"hsi": 30, "sar": 4}, num_classes=7)
    n_params = sum(p.numel() for p in default.parameters())
    assert 300_000 <= n_params <= 600_000  # spec 6.4 budget
    with pytest.raises(ValueError, match="branches"):
        tiny_net(branches=("cnn", "gru"))


# ------------------------------------------------------------------ stage 2: mutual learning

def test_mutual_learning_terms_zero_iff_branches_agree():
    g = torch.Generator().manual_seed(0)
    logits, proj = torch.randn(6, K, generator=g), F.normalize(torch.randn(6, 8, generator=g), dim=1)
    same_l, same_p = [logits] * 3, [proj] * 3
    assert dml_kl_loss(same_l).abs() < 1e-6
    assert entropy_gap_loss(same_l).abs() < 1e-6
    assert feature_similarity_loss(same_p).abs() < 1e-6

    other_l = [logits, torch.randn(6, K, generator=g), 3 * torch.randn(6, K, generator=g)]
    other_p = [proj, F.normalize(torch.randn(6, 8, generator=g), dim=1), proj]
    assert dml_kl_loss(other_l) > 1e-3 and entropy_gap_loss(other_l) > 1e-3
    assert feature_similarity_loss(other_p) > 1e-3

    # value check against the textbook formula for two branches, tau = 2
    a, b = other_l[0], other_l[1]
    pa, pb = torch.softmax(a / 2, -1), torch.softmax(b / 2, -1)
    kl = lambda p, q: (p * (p.log() - q.log())).sum(-1).mean()  # noqa: E731
    torch.testing.assert_close(dml_kl_loss([a, b], 2.0), 4 * (kl(pb, pa) + kl(pa, pb)) / 2)
    ent = lambda p: -(p * p.log()).sum(-1).mean()  # noqa: E731
    torch.testing.assert_close(entropy_gap_loss([a, b], 2.0), (ent(pa) - ent(pb)).abs())
    torch.testing.assert_close(feature_similarity_loss([proj, -proj]), torch.tensor(2.0))

    # the KL teacher side is stop-gradient: the student receives a gradient, the teacher none
    student, teacher = a.clone().requires_grad_(), b.clone().requires_grad_()
    F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1).detach(), log_target=True,
             reduction="batchmean").backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    assert dml_kl_loss([a]) == 0 and feature_similarity_loss([proj]) == 0

    assert [warmup_weight(p) for p in (0.0, 0.05, 0.1, 0.7)] == pytest.approx([0.0, 0.5, 1.0, 1.0])
    assert warmup_weight(0.0, 0.0) == 1.0


@pytest.mark.parametrize("ml, branches, guided", [
    ("both", ("cnn", "mamba", "transformer"), True),
    ("none", ("cnn", "mamba", "transformer"), True),
    ("prob", ("cnn", "mamba", "transformer"), True),
    ("feat", ("cnn", "mamba", "transformer"), True),
    ("both", ("cnn", "mamba", "transformer"), False),
    ("both", ("cnn",), True),
    ("both", ("mamba",), True),
    ("both", ("transformer",), True),
])
def test_stage2_ablation_switches_train(ml, branches, guided):
    torch.manual_seed(0)
    channels = {"cnn": 8, "mamba": 12, "transformer": 10} if guided else {}
    net = tiny_net(branches=branches, guide_channels=channels)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    target = torch.tensor([0, 1, 2, 1])
    out = net(patches(), guides())
    terms = bdgf_loss(out, target, ml=ml, warmup=0.5)
    opt.zero_grad()
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"])
    expected = terms["ce"]
    if ml in ("prob", "both"):
        expected = expected + 0.5 * (terms["prob_kl"] + 0.1 * terms["entropy_gap"])
    if ml in ("feat", "both"):
        expected = expected + 0.5 * 0.5 * terms["feat_cos"]
    torch.testing.assert_close(terms["loss"], expected)
    for name, p in net.branches.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert any("guide_proj" in n for n, _ in net.branches.named_parameters()) == guided
    projector_learns = ml in ("feat", "both") and len(branches) > 1
    for name, p in net.projectors.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == projector_learns, name
    opt.step()
    assert torch.isfinite(bdgf_loss(net(patches(), guides()), target, ml=ml)["loss"])
