"""BDGF stage 1: the noise schedule, the multimodal denoiser UNet, modality masking and its losses."""
import pytest
import torch
import torch.nn.functional as F

from rsfusion.lightning_modules.bdgf_pretrain import ModalityMaskingController
from rsfusion.lightning_modules.networks.bdgf import (
    BDGFNet,
)
from rsfusion.lightning_modules.networks.bdgf_diffusion import (
    DiffusionSchedule,
    MultimodalDenoiserUNet,
    ddpm_training_loss,
    denoising_loss,
    draw_channel_mask,
    masked_diffusion_loss,
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


# ------------------------------------------------------------------ stage 1: schedule and UNet
def test_schedule_matches_closed_form():
    sch = DiffusionSchedule(1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    assert sch.betas.shape == (1000,)
    assert sch.betas[0].item() == pytest.approx(1e-4) and sch.betas[-1].item() == pytest.approx(0.02)
    torch.testing.assert_close(sch.alphas_cumprod.double(), abar, rtol=1e-5, atol=1e-7)

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    t = torch.tensor([0, 499, 999])
    expected = abar[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - abar[t]).sqrt().view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(sch.q_sample(x0, t, noise).double(), expected, rtol=1e-5, atol=1e-6)

    # empirical moments of q(x_t | x0) for a constant x0 = 0.7
    n = 200_000
    for step in (10, 300, 900):
        xt = sch.q_sample(torch.full((n, 1), 0.7), torch.full((n,), step), torch.randn(n, 1, generator=g))
        assert xt.mean().item() == pytest.approx(0.7 * abar[step].sqrt().item(), abs=0.01)
        assert xt.var().item() == pytest.approx(1 - abar[step].item(), abs=0.01)

    with pytest.raises(ValueError, match="t must lie"):
        sch.q_sample(x0, torch.tensor([0, 1, 1000]), noise)
    with pytest.raises(ValueError, match="schedule"):
        DiffusionSchedule(10, schedule="quadratic")
    cosine = DiffusionSchedule(100, schedule="cosine")
    assert torch.all(cosine.alphas_cumprod[1:] < cosine.alphas_cumprod[:-1])


def test_unet_shapes_features_and_parameter_count():
    net = tiny_unet()
    x = torch.randn(2, 8, 16, 12)
    eps, feats = net(x, torch.tensor([1, 40]), return_features=True)
    assert eps.shape == x.shape
    assert net.feature_channels == {0: 8, 1: 16}
    assert {lvl: tuple(f.shape) for lvl, f in feats.items()} == {0: (2, 8, 16, 12), 1: (2, 16, 8, 6)}
    only_deep = net(x, torch.tensor([1, 40]), return_features=True, feature_levels=(1,))[1]
    torch.testing.assert_close(only_deep[1], feats[1])
    assert list(only_deep) == [1]
    with pytest.raises(ValueError, match="timesteps"):
        net(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="multiples of 2"):
        net(torch.randn(1, 8, 15, 16), torch.tensor([0]))
    with pytest.raises(ValueError, match="x_t must be"):
        net(torch.randn(1, 7, 16, 16), torch.tensor([0]))

    with torch.device("meta"):
        default = MultimodalDenoiserUNet({"hsi": 30, "sar": 4})
        eps, feats = default(torch.empty(2, 34, 32, 32), torch.zeros(2, dtype=torch.long), return_features=True)
    assert eps.shape == (2, 34, 32, 32)
    assert {lvl: tuple(f.shape) for lvl, f in feats.items()} == {0: (2, 64, 32, 32), 1: (2, 128, 16, 16),
                                                                 2: (2, 128, 8, 8)}  # spec section 5
    n_params = sum(p.numel() for p in default.parameters())
    assert n_params == 6_526_468  # spec 4.1 expects 6-9 M
    assert default.feature_channels == {0: 64, 1: 128, 2: 128}
    assert default.downsample_factor == 4


# ------------------------------------------------------------------ stage 1: loss and masking
def test_per_modality_loss_is_invariant_to_duplicating_bands():
    g = torch.Generator().manual_seed(0)
    pred, eps = torch.randn(4, 8, 6, 6, generator=g), torch.randn(4, 8, 6, 6, generator=g)
    pred[:, :6] += 1.0  # make the spectral modality's error much larger than the SAR one's
    dup_pred = torch.cat([pred[:, :6], pred[:, :6], pred[:, 6:]], dim=1)
    dup_eps = torch.cat([eps[:, :6], eps[:, :6], eps[:, 6:]], dim=1)

    loss, per_sample = denoising_loss(pred, eps, {"hsi": 6, "sar": 2})
    dup_loss, dup_per_sample = denoising_loss(dup_pred, dup_eps, {"hsi": 12, "sar": 2})
    torch.testing.assert_close(dup_loss, loss)
    torch.testing.assert_close(dup_per_sample, per_sample)
    torch.testing.assert_close(loss, per_sample.mean())

    chan, _ = denoising_loss(pred, eps, [6, 2], weighting="per_channel")
    dup_chan, _ = denoising_loss(dup_pred, dup_eps, [12, 2], weighting="per_channel")
    torch.testing.assert_close(chan, F.mse_loss(pred, eps))
    assert dup_chan > chan + 0.05  # per-channel weighting lets the duplicated modality dominate
    with pytest.raises(ValueError, match="weighting"):
        denoising_loss(pred, eps, [6, 2], weighting="per_pixel")


def feed(controller, loss_fns, steps):
    for k in range(steps):
        controller.step(torch.tensor([fn(k) for fn in loss_fns]))


def test_masking_controller_masks_the_faster_learner_more():
    fast, slow = (lambda k: 0.97 ** k), (lambda k: 0.999 ** k)
    ctrl = ModalityMaskingController(["hsi", "sar"], window=10, ema_momentum=0.5)
    assert ctrl.probabilities == pytest.approx({"hsi": 0.3, "sar": 0.1})
    feed(ctrl, [fast, slow], 60)
    assert int(ctrl.num_updates) == 5
    assert ctrl.rho[0] > 1 > ctrl.rho[1]
    assert ctrl.probabilities["hsi"] > 0.3 + 0.04 and ctrl.probabilities["sar"] < 0.1
    assert ctrl.probabilities["sar"] >= ctrl.p_min

    swapped = ModalityMaskingController(["hsi", "sar"], window=10, ema_momentum=0.5)
    feed(swapped, [slow, fast], 60)
    assert swapped.probabilities["sar"] > 0.1 + 0.04 and swapped.probabilities["hsi"] < 0.3
    assert set(swapped.log_state()) == {"p_mask/hsi", "p_mask/sar", "ema_loss/hsi", "ema_loss/sar",
                                        "rho/hsi", "rho/sar"}

    fixed = ModalityMaskingController(["hsi", "sar"], mode="random_fixed", window=10, ema_momentum=0.5)
    feed(fixed, [fast, slow], 60)
    assert fixed.probabilities == pytest.approx({"hsi": 0.3, "sar": 0.1}) and fixed.rho[0] > 1
    none = ModalityMaskingController(["hsi", "sar"], mode="none")
    assert none.probabilities == {"hsi": 0.0, "sar": 0.0}
    assert not none.sample_mask(100).any()

    # state survives a checkpoint round trip
    restored = ModalityMaskingController(["hsi", "sar"], window=10, ema_momentum=0.5)
    restored.load_state_dict(ctrl.state_dict())
    assert restored.probabilities == ctrl.probabilities

    # gradient-norm criterion: the modality with the larger stem gradients is masked more
    by_grad = ModalityMaskingController(["hsi", "sar"], window=5, criterion="grad_norm")
    feed(by_grad, [lambda k: 2.0, lambda k: 1.0], 6)
    assert by_grad.rho.tolist() == pytest.approx([2.0, 0.5])
    assert by_grad.probabilities == pytest.approx({"hsi": 0.35, "sar": 0.075})

    with pytest.raises(ValueError, match="single modality"):
        ModalityMaskingController(["hsi"])
    with pytest.raises(ValueError, match="mode"):
        ModalityMaskingController(["hsi", "sar"], mode="always")


def test_masking_never_hides_every_modality_and_matches_probabilities():
    g = torch.Generator().manual_seed(0)
    ctrl = ModalityMaskingController(["hsi", "sar"], initial_probabilities=(0.45, 0.45))
    masks = ctrl.sample_mask(20_000, generator=g)
    assert masks.shape == (20_000, 2) and masks.dtype == torch.bool
    assert masks.sum(dim=1).max() == 1
    assert masks.float().mean(dim=0).tolist() == pytest.approx([0.45, 0.45], abs=0.015)

    three = ModalityMaskingController(["hsi", "sar", "dsm"], window=2, ema_momentum=0.0, max_total=0.9)
    for k in range(40):  # one modality improves extremely fast: its probability hits p_max
        three.step([10.0 ** (-k), 1.0, 1.0])
    probs = torch.tensor(list(three.probabilities.values()))
    assert probs.sum() <= 0.9 + 1e-9 and probs[0] == pytest.approx(three.p_max)
    masks = three.sample_mask(20_000, generator=g)
    assert masks.sum(dim=1).max() == 1

    channel_mask = draw_channel_mask(masks[:64], [3, 2, 1])
    assert channel_mask.shape == (64, 6)
    assert torch.equal(channel_mask[:, [0, 3, 5]], masks[:64])
    assert not channel_mask.all(dim=1).any()


def test_band_group_mask_hides_one_contiguous_group():
    modality_mask = torch.tensor([[True, False], [False, True], [False, False]])
    cm = draw_channel_mask(modality_mask, [6, 2], granularity="band_group", band_group_fraction=0.5,
                           generator=torch.Generator().manual_seed(0))
    assert cm[0, :6].sum() == 3 and not cm[0, 6:].any()
    hidden = cm[0, :6].nonzero().flatten()
    assert (hidden.diff() == 1).all()
    assert cm[1, 6:].sum() == 1 and not cm[1, :6].any() and not cm[2].any()


# ------------------------------------------------------------------ stage 1: ablations train a step
@pytest.mark.parametrize("mode, weighting, granularity, unet_kwargs, masked_target", [
    ("none", "per_modality", "modality", {}, "x0"),
    ("random_fixed", "per_modality", "modality", {}, "x0"),
    ("adaptive", "per_modality", "modality", {}, "x0"),
    ("adaptive", "per_modality", "modality", {}, "none"),
    ("adaptive", "per_channel", "modality", {}, "x0"),
    ("adaptive", "per_channel", "band_group", {}, "none"),
    ("adaptive", "per_modality", "band_group", {}, "x0"),
    ("adaptive", "per_modality", "modality", {"mask_fill": "noise", "mask_indicator": "embedding"}, "x0"),
])
def test_stage1_ablation_switches_train(mode, weighting, granularity, unet_kwargs, masked_target):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net, sch = tiny_unet(**unet_kwargs), DiffusionSchedule(50)
    ctrl = ModalityMaskingController(list(MODS), mode=mode, initial_probabilities=(0.45, 0.45), window=1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x0 = torch.randn(8, 8, 8, 8, generator=g)
    for _ in range(3):
        modality_mask = ctrl.sample_mask(8, generator=g)
        channel_mask = draw_channel_mask(modality_mask, MODS, granularity, generator=g)
        out = ddpm_training_loss(net, sch, x0, channel_mask, weighting, generator=g, masked_target=masked_target)
        opt.zero_grad()
        out["loss"].backward()
        ctrl.step(out["unmasked_modality_losses"])
        assert torch.isfinite(out["loss"]) and out["modality_losses"].shape == (2,)
        for name in ("stems.hsi.weight", "stems.sar.weight", "input_conv.weight", "out.2.weight",
                     "time_mlp.0.weight", "up.1.0.0.0.conv1.weight"):
            assert net.get_parameter(name).grad.abs().sum() > 0, name
        stem_norms = net.stem_gradient_norms()
        assert stem_norms.shape == (2,) and (stem_norms > 0).all()
        mask_grad = net.mask_value.grad
        if mode == "none" or unet_kwargs.get("mask_fill") == "noise":
            assert mask_grad is None or mask_grad.abs().sum() == 0  # no fill value to learn
        else:
            assert channel_mask.any() and (mask_grad[channel_mask.any(dim=0)] != 0).any()
            assert (mask_grad[~channel_mask.any(dim=0)] == 0).all()
        if net.mask_embedding is not None:
            assert (net.mask_embedding.grad.abs().sum(dim=1) > 0).tolist() == modality_mask.any(dim=0).tolist()
        opt.step()
    if mode == "adaptive":
        assert int(ctrl.num_updates) >= 1


# ------------------------------------------------------------------ stage 1: the masked modality's target
def correlated_tiles(count, seed, size=8):
    """HSI-like 4-band smooth fields and a 2-band aux modality = fixed linear map of them + small noise."""
    g = torch.Generator().manual_seed(seed)
    hsi = 3 * F.avg_pool2d(F.pad(torch.randn(count, 4, size, size, generator=g), (1, 1, 1, 1), mode="circular"), 3, 1)
    mixing = torch.tensor([[0.8, -0.5, 0.3, 0.1], [-0.2, 0.4, 0.7, -0.6]])
    aux = torch.einsum("oc,bchw->bohw", mixing, hsi) + 0.05 * torch.randn(count, 2, size, size, generator=g)
    return torch.cat([hsi, aux], dim=1)


def _train_with_aux_masked(objective: str, steps: int) -> tuple[MultimodalDenoiserUNet, DiffusionSchedule]:
    """A tiny UNet trained on correlated tiles with the aux modality hidden in every other sample."""
    mods = {"hsi": 4, "aux": 2}
    torch.manual_seed(0)
    net = MultimodalDenoiserUNet(mods, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(),
                                 stem_channels=4, norm_groups=4, dropout=0.0)
    sch, g = DiffusionSchedule(50), torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    data = correlated_tiles(256, seed=0)
    channel_mask = torch.zeros(16, 6, dtype=torch.bool)
    channel_mask[::2, 4:] = True
    for _ in range(steps):
        x0 = data[torch.randint(0, 256, (16,), generator=g)]
        if objective == "eps_everywhere":  # the pre-fix objective: the hidden channels' noise as target
            t, noise = sch.sample_timesteps(16, generator=g), torch.randn(x0.shape, generator=g)
            loss = denoising_loss(net(sch.q_sample(x0, t, noise), t, channel_mask=channel_mask), noise, mods)[0]
        else:
            loss = ddpm_training_loss(net, sch, x0, channel_mask, generator=g, masked_target=objective)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net, sch


def _masked_aux_errors(net, sch) -> tuple[float, float]:
    """On unseen tiles with aux hidden everywhere: (aux x0 MSE / aux variance, aux eps MSE)."""
    x0, g = correlated_tiles(64, seed=5), torch.Generator().manual_seed(9)
    t, noise = sch.sample_timesteps(64, generator=g), torch.randn(x0.shape, generator=g)
    channel_mask = torch.zeros(64, 6, dtype=torch.bool)
    channel_mask[:, 4:] = True
    with torch.no_grad():
        pred = net(sch.q_sample(x0, t, noise), t, channel_mask=channel_mask)
    aux, aux_pred = x0[:, 4:], pred[:, 4:]
    x0_error = (aux_pred - aux).pow(2).mean() / aux.var(dim=(0, 2, 3), unbiased=False).mean()
    return float(x0_error), float((aux_pred - noise[:, 4:]).pow(2).mean())


def test_masked_modality_target_is_learnable_from_the_visible_one():
    net, sch = _train_with_aux_masked("x0", steps=100)
    x0_error, _ = _masked_aux_errors(net, sch)
    # 1 = predicting the mean (and the floor of the old epsilon objective): the aux modality is
    # reconstructed from the HSI it depends on
    assert x0_error < 0.5, x0_error
    # the loss reported for the masked half is in the same units and falls too
    out = ddpm_training_loss(net, sch, correlated_tiles(16, seed=7), torch.tensor([[False] * 4 + [True] * 2] * 16),
                             generator=torch.Generator().manual_seed(3))
    assert float(out["masked_modality_losses"][1]) < 0.5 and torch.isnan(out["masked_modality_losses"][0])
    assert torch.isnan(out["unmasked_modality_losses"][1])

    # the pre-fix objective: the hidden aux channels' noise is independent of the network's input, so
    # their epsilon loss cannot go below 1 (E[(f - eps)^2] = E[f^2] + 1), and nothing about aux is learnt
    old, sch = _train_with_aux_masked("eps_everywhere", steps=40)
    old_x0_error, old_eps_error = _masked_aux_errors(old, sch)
    assert old_eps_error > 0.95 and old_x0_error > 0.9


def _hand_batch():
    """3 samples, hsi (2 bands) hidden in sample 0, sar (1 band) hidden in sample 1, 2 x 2 pixels."""
    g = torch.Generator().manual_seed(0)
    pred, noise, x0 = (torch.randn(3, 3, 2, 2, generator=g) for _ in range(3))
    channel_mask = torch.tensor([[True, True, False], [False, False, True], [False, False, False]])
    return pred.requires_grad_(), noise, x0, channel_mask


def test_masked_target_none_drops_hidden_modalities_exactly():
    pred, noise, x0, channel_mask = _hand_batch()
    out = masked_diffusion_loss(pred, noise, x0, channel_mask, {"hsi": 2, "sar": 1}, masked_target="none")
    sq = (pred.detach() - noise).pow(2)
    hsi = (sq[1, :2].mean() + sq[2, :2].mean()) / 2  # the samples where hsi is visible
    sar = (sq[0, 2].mean() + sq[2, 2].mean()) / 2
    torch.testing.assert_close(out["modality_losses"], torch.stack([hsi, sar]))
    torch.testing.assert_close(out["loss"].detach(), (hsi + sar) / 2)
    torch.testing.assert_close(out["unmasked_modality_losses"], torch.stack([hsi, sar]))
    out["loss"].backward()
    assert (pred.grad[0, :2] == 0).all() and (pred.grad[1, 2] == 0).all()  # exactly no gradient
    visible = ~channel_mask[:, :, None, None].expand_as(pred)
    assert (pred.grad[visible] != 0).all()

    # changing a hidden entry's target or prediction changes nothing
    bumped_noise, bumped_pred = noise.clone(), pred.detach().clone()
    bumped_noise[0, :2] += 5.0
    bumped_pred[1, 2] -= 3.0
    again = masked_diffusion_loss(bumped_pred, bumped_noise, x0, channel_mask, [2, 1], masked_target="none")
    torch.testing.assert_close(again["loss"], out["loss"].detach())

    # per-channel weighting: the mean over the visible elements
    chan = masked_diffusion_loss(pred.detach(), noise, x0, channel_mask, [2, 1], "per_channel", "none")
    torch.testing.assert_close(chan["loss"], sq[visible].mean())

    # a modality hidden in every sample adds 0 (it has no samples to average over)
    all_sar = torch.tensor([[False, False, True]] * 3)
    only_hsi = masked_diffusion_loss(pred.detach(), noise, x0, all_sar, [2, 1], masked_target="none")
    torch.testing.assert_close(only_hsi["loss"], sq[:, :2].mean() / 2)
    assert only_hsi["modality_losses"][1] == 0 and torch.isnan(only_hsi["unmasked_modality_losses"][1])


def test_masked_target_x0_hand_computation():
    pred, noise, x0, channel_mask = _hand_batch()
    out = masked_diffusion_loss(pred, noise, x0, channel_mask, {"hsi": 2, "sar": 1}, masked_target="x0")
    p = pred.detach()
    variance = x0.var(dim=(0, 2, 3), unbiased=False)  # per channel over the batch
    target_sq = (p - noise).pow(2)
    x0_sq = (p - x0).pow(2) / variance.view(1, -1, 1, 1)
    target_sq[0, :2], target_sq[1, 2] = x0_sq[0, :2], x0_sq[1, 2]
    hsi, sar = target_sq[:, :2].mean(), target_sq[:, 2].mean()
    torch.testing.assert_close(out["loss"].detach(), (hsi + sar) / 2)
    torch.testing.assert_close(out["masked_modality_losses"], torch.stack([x0_sq[0, :2].mean(), x0_sq[1, 2].mean()]))
    eps_sq = (p - noise).pow(2)
    torch.testing.assert_close(out["unmasked_modality_losses"],  # the controller's figure: as under "none"
                               torch.stack([(eps_sq[1, :2].mean() + eps_sq[2, :2].mean()) / 2,
                                            (eps_sq[0, 2].mean() + eps_sq[2, 2].mean()) / 2]))
    out["loss"].backward()
    assert (pred.grad != 0).all()
    with pytest.raises(ValueError, match="masked_target must be one of"):
        masked_diffusion_loss(p, noise, x0, channel_mask, [2, 1], masked_target="eps")


def test_masked_target_none_leaves_a_fully_hidden_modality_untrained():
    """Through the UNet: with sar hidden in every sample, its output rows get no gradient under none."""
    x0, grads = torch.randn(4, 8, 8, 8, generator=torch.Generator().manual_seed(0)), {}
    channel_mask = torch.zeros(4, 8, dtype=torch.bool)
    channel_mask[:, 6:] = True
    for target in ("none", "x0"):
        torch.manual_seed(0)
        net = tiny_unet()
        out = ddpm_training_loss(net, DiffusionSchedule(50), x0, channel_mask,
                                 generator=torch.Generator().manual_seed(1), masked_target=target)
        out["loss"].backward()
        grads[target] = (net.out[2].weight.grad, net.out[2].bias.grad)
    weight, bias = grads["none"]
    assert (weight[6:] == 0).all() and (bias[6:] == 0).all() and (weight[:6] != 0).any()
    assert (grads["x0"][0][6:] != 0).any() and (grads["x0"][1][6:] != 0).all()


# ------------------------------------------------------------------ stage 1b: feature cube
