"""BDGF stages 1 and 1b: multimodal DDPM with adaptive modality masking, and diffusion features.

BDGF (Liu et al., arXiv 2509.23310) pre-trains a multimodal DDPM with an *adaptive modality
masking* strategy so that the learned distribution is not dominated by the spectral image, then
uses the frozen denoiser's features to guide a three-branch classifier (see ``bdgf.py``).

Only the skeleton is the paper's (abstract; the code it announces at github.com/HaoLiu-XDU/BDGF was
not available to this project, and nothing here has been compared with it): a multimodal DDPM, adaptive modality masking, and
diffusion features hierarchically guiding CNN/Mamba/Transformer branches. Everything below the
skeleton is a reconstruction [R] or an rsfusion default [D] from ``specs/bdgf.md``; every such
number is a constructor/function argument:

- schedule: T=1000, linear betas 1e-4..0.02, eps-prediction, MSE (Ho et al.) [D];
- denoiser: guided-diffusion style 2-D UNet, base 64, mult (1, 2, 2), 2 res-blocks per level,
  GroupNorm(32)+SiLU, sinusoidal time embedding -> MLP (4 x base), self-attention at the deepest
  level (8x8 for 32x32 tiles), dropout 0.1 [D]; per-modality 1x1 input stems (32 ch each) [D];
- masking: whole modalities on the UNet input, learned per-channel fill value, indicator channel
  per modality stem, loss averaged per modality [R]; a masked modality's outputs predict its clean
  x0 (``masked_target="x0"``, variance-normalised MSE) or add no loss (``"none"``), never its
  noise, which the network cannot see [R, spec 4.2 corrected]; adaptation from relative progress of
  the visible-sample epsilon loss with EMA 0.99, windows of 200 steps, eta 0.05, p in [0.05, 0.5],
  start (0.3, 0.1) [D];
- features: timesteps {50, 150} averaged, the three decoder levels, bilinear upsampling to tile
  resolution, tiles stitched with 50 % overlap [D].

Decoder levels are numbered from 0 = full resolution (shallowest, the spec's "level-1 32x32") to
``len(channel_mult) - 1`` = deepest (the spec's "level-3 8x8").
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DiffusionSchedule",
    "MultimodalDenoiserUNet",
    "ModalityMaskingController",
    "denoising_loss",
    "masked_diffusion_loss",
    "draw_channel_mask",
    "ddpm_training_loss",
    "scene_noise",
    "feature_cube_channels",
    "extract_feature_cube",
]

SCHEDULES = ("linear", "cosine")
LOSS_WEIGHTINGS = ("per_channel", "per_modality")
MASK_MODES = ("none", "random_fixed", "adaptive")
MASK_GRANULARITIES = ("modality", "band_group")
MASK_FILLS = ("learned", "noise")
MASK_INDICATORS = ("channel", "embedding", "both")
CRITERIA = ("loss_progress", "grad_norm")
BLENDS = ("mean", "center")
TIMESTEP_REDUCTIONS = ("mean", "concat")
MASKED_TARGETS = ("x0", "none")
# Smallest per-channel x0 variance used to normalise the masked channels' x0 loss: keeps a channel
# that is (nearly) constant over a batch from blowing the loss up [D].
X0_VARIANCE_FLOOR = 1e-3


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_modality_channels(modality_channels: Mapping[str, int]) -> dict[str, int]:
    if not modality_channels:
        raise ValueError("modality_channels must name at least one modality")
    for name, channels in modality_channels.items():
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"modality_channels: invalid modality name {name!r}")
        if int(channels) < 1:
            raise ValueError(f"modality_channels[{name!r}] must be >= 1, got {channels}")
    return {name: int(c) for name, c in modality_channels.items()}


# ----------------------------------------------------------------------------------------------
# Noise schedule
# ----------------------------------------------------------------------------------------------
class DiffusionSchedule(nn.Module):
    """DDPM forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

    Defaults (T=1000, linear betas 1e-4..0.02) are Ho et al.'s and rsfusion's [D]; the cosine
    schedule (Nichol & Dhariwal) is offered as the MTMSD-style alternative. The tensors are
    buffers, so the schedule follows ``.to(device)`` and is saved in checkpoints.

    Attributes (all shape (T,)): ``betas``, ``alphas``, ``alphas_cumprod``,
    ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``.
    """

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 schedule: str = "linear", cosine_s: float = 0.008):
        super().__init__()
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        _check_choice("schedule", schedule, SCHEDULES)
        if schedule == "linear":
            if not 0.0 < beta_start <= beta_end < 1.0:
                raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
            betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        else:
            steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
            f = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.num_timesteps = num_timesteps
        self.register_buffer("betas", betas.float())
        self.register_buffer("alphas", alphas.float())
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.register_buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt().float())
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1 - alphas_cumprod).sqrt().float())

    def sample_timesteps(self, batch_size: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        """Uniform integer timesteps in [0, T), shape (batch_size,)."""
        t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator)
        return t.to(device if device is not None else self.betas.device)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise. x0, noise (B, ...); t (B,) integer."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal x0 shape {tuple(x0.shape)}")
        t = torch.as_tensor(t, device=x0.device).long().reshape(-1)
        if t.numel() == 1 and x0.shape[0] != 1:
            t = t.expand(x0.shape[0])
        if t.shape[0] != x0.shape[0]:
            raise ValueError(f"t must have one timestep per sample ({x0.shape[0]}), got {t.shape[0]}")
        if int(t.min()) < 0 or int(t.max()) >= self.num_timesteps:
            raise ValueError(f"t must lie in [0, {self.num_timesteps}), got range "
                             f"[{int(t.min())}, {int(t.max())}]")
        view = (-1,) + (1,) * (x0.dim() - 1)
        t = t.to(self.betas.device)
        mean_coef = self.sqrt_alphas_cumprod[t].view(view).to(x0)
        std = self.sqrt_one_minus_alphas_cumprod[t].view(view).to(x0)
        return mean_coef * x0 + std * noise


# ----------------------------------------------------------------------------------------------
# Denoiser UNet
# ----------------------------------------------------------------------------------------------
def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of integer timesteps, (B,) -> (B, dim) (guided-diffusion layout)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class ResBlock(nn.Module):
    """Norm-SiLU-Conv, + time embedding, Norm-SiLU-Dropout-Conv, residual. (B,Ci,H,W) -> (B,Co,H,W)."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float, norm: str, groups: int):
        super().__init__()
        self.norm1 = _norm(norm, in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_channels)
        self.norm2 = _norm(norm, out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention2d(nn.Module):
    """Pre-norm multi-head self-attention over all pixels, residual. (B,C,H,W) -> (B,C,H,W)."""

    def __init__(self, channels: int, heads: int, norm: str, groups: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention_heads ({heads}) must divide the channel count {channels}")
        self.norm = _norm(norm, channels, groups)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        out, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class MultimodalDenoiserUNet(nn.Module):
    """Epsilon-predicting 2-D UNet over channel-stacked modalities, with per-modality stems.

    Input ``x_t`` (B, C, H, W) stacks the modalities in the order of ``modality_channels``
    (C = sum of band counts); H and W must be multiples of ``downsample_factor``. Output has the
    same shape. Each modality has its own 1x1 stem (bands + 1 indicator channel -> ``stem_channels``)
    so band counts are free and every modality gets the same channel budget [D].

    Masking: ``channel_mask`` (B, C) bool marks channels hidden from the network; they are replaced
    by a learned per-channel value (``mask_fill="learned"``, init 0) or fresh Gaussian noise
    (``"noise"``), and the fraction of masked bands of each modality is given to the network as a
    constant indicator channel on that modality's stem (``mask_indicator="channel"``) and/or as a
    learned per-modality embedding added to the time embedding (``"embedding"``) [R].

    With ``return_features=True`` the forward also returns ``{level: (B, C_l, H / 2**l, W / 2**l)}``,
    the output of decoder level ``l`` (its last res/attention block, before upsampling), with
    ``C_l = base_channels * channel_mult[l]`` (see ``feature_channels``).

    Architecture defaults are rsfusion's [D] (guided-diffusion style, spec section 4.1).
    ``norm="none"`` and ``attention_levels=()`` give a purely local (convolutional) network, whose
    tiled features equal the untiled ones away from tile borders.
    """

    def __init__(self, modality_channels: Mapping[str, int], base_channels: int = 64,
                 channel_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 2,
                 attention_levels: Sequence[int] = (2,), attention_heads: int = 4,
                 dropout: float = 0.1, stem_channels: int = 32, norm: str = "group",
                 norm_groups: int = 32, time_embed_mult: int = 4, mask_fill: str = "learned",
                 mask_indicator: str = "channel"):
        super().__init__()
        self.modality_channels = check_modality_channels(modality_channels)
        _check_choice("norm", norm, ("group", "none"))
        _check_choice("mask_fill", mask_fill, MASK_FILLS)
        _check_choice("mask_indicator", mask_indicator, MASK_INDICATORS)
        if base_channels < 1 or stem_channels < 1 or num_res_blocks < 1 or not channel_mult:
            raise ValueError("base_channels, stem_channels, num_res_blocks must be >= 1 and channel_mult non-empty")
        levels = len(channel_mult)
        if any(not 0 <= lvl < levels for lvl in attention_levels):
            raise ValueError(f"attention_levels must lie in [0, {levels}), got {tuple(attention_levels)}")
        self.channel_mult = tuple(channel_mult)
        self.num_levels = levels
        self.downsample_factor = 2 ** (levels - 1)
        self.mask_fill = mask_fill
        self.mask_indicator = mask_indicator
        total = sum(self.modality_channels.values())
        self.in_channels = total
        emb_dim = base_channels * time_embed_mult
        self.base_channels = base_channels

        indicator = 1 if mask_indicator in ("channel", "both") else 0
        self.stems = nn.ModuleDict({name: nn.Conv2d(c + indicator, stem_channels, 1)
                                    for name, c in self.modality_channels.items()})
        self.mask_value = nn.Parameter(torch.zeros(total))
        self.mask_embedding = (nn.Parameter(torch.zeros(len(self.modality_channels), emb_dim))
                               if mask_indicator in ("embedding", "both") else None)
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_conv = nn.Conv2d(stem_channels * len(self.modality_channels), base_channels, 3, padding=1)

        def block(cin, cout, level):
            attn = (SelfAttention2d(cout, attention_heads, norm, norm_groups)
                    if level in attention_levels else nn.Identity())
            return nn.ModuleList([ResBlock(cin, cout, emb_dim, dropout, norm, norm_groups), attn])

        self.down = nn.ModuleList()
        skips, ch = [base_channels], base_channels
        for level, mult in enumerate(channel_mult):
            stage = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.append(block(ch, base_channels * mult, level))
                ch = base_channels * mult
                skips.append(ch)
            downsample = nn.Conv2d(ch, ch, 3, stride=2, padding=1) if level < levels - 1 else nn.Identity()
            if level < levels - 1:
                skips.append(ch)
            self.down.append(nn.ModuleList([stage, downsample]))

        deepest_attention = (levels - 1) in attention_levels
        self.mid_block1 = ResBlock(ch, ch, emb_dim, dropout, norm, norm_groups)
        self.mid_attn = SelfAttention2d(ch, attention_heads, norm, norm_groups) if deepest_attention else nn.Identity()
        self.mid_block2 = ResBlock(ch, ch, emb_dim, dropout, norm, norm_groups)

        self.up = nn.ModuleList()
        self.feature_channels: dict[int, int] = {}
        for level in reversed(range(levels)):
            stage = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.append(block(ch + skips.pop(), base_channels * channel_mult[level], level))
                ch = base_channels * channel_mult[level]
            self.feature_channels[level] = ch
            upsample = (nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1))
                        if level > 0 else nn.Identity())
            self.up.append(nn.ModuleList([stage, upsample]))
        self.feature_channels = dict(sorted(self.feature_channels.items()))
        self.out = nn.Sequential(_norm(norm, ch, norm_groups), nn.SiLU(), nn.Conv2d(ch, total, 3, padding=1))

    @property
    def modality_names(self) -> list[str]:
        return list(self.modality_channels)

    def modality_slices(self) -> dict[str, slice]:
        """Channel range of each modality in the stacked input."""
        out, start = {}, 0
        for name, c in self.modality_channels.items():
            out[name] = slice(start, start + c)
            start += c
        return out

    def stem_gradient_norms(self) -> Tensor:
        """L2 norm of each modality stem's weight gradient, (M,) (for ``criterion="grad_norm"``)."""
        norms = [s.weight.grad.norm() if s.weight.grad is not None else s.weight.new_zeros(())
                 for s in self.stems.values()]
        return torch.stack(norms).detach()

    def _embed_inputs(self, x: Tensor, channel_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        b, _, h, w = x.shape
        if channel_mask is None:
            channel_mask = torch.zeros(b, self.in_channels, dtype=torch.bool, device=x.device)
        if channel_mask.shape != (b, self.in_channels):
            raise ValueError(f"channel_mask must have shape {(b, self.in_channels)}, got {tuple(channel_mask.shape)}")
        keep = ~channel_mask[:, :, None, None]
        if self.mask_fill == "learned":
            fill = self.mask_value.view(1, -1, 1, 1).to(x.dtype).expand_as(x)
        else:
            fill = torch.randn_like(x)
        x = torch.where(keep, x, fill)
        stems, fractions = [], []
        for name, sl in self.modality_slices().items():
            frac = channel_mask[:, sl].float().mean(dim=1)
            fractions.append(frac)
            inp = x[:, sl]
            if self.mask_indicator in ("channel", "both"):
                inp = torch.cat([inp, frac.view(b, 1, 1, 1).to(x.dtype).expand(b, 1, h, w)], dim=1)
            stems.append(self.stems[name](inp))
        return self.input_conv(torch.cat(stems, dim=1)), torch.stack(fractions, dim=1)

    def forward(self, x_t: Tensor, t: Tensor, channel_mask: Tensor | None = None,
                return_features: bool = False, feature_levels: Sequence[int] | None = None):
        """Predict the noise. x_t (B, C, H, W), t (B,) int -> eps (B, C, H, W) [, {level: map}].

        Channels hidden by ``channel_mask`` are trained to predict their clean x0 instead when
        ``masked_target="x0"`` (see :func:`masked_diffusion_loss`).
        """
        if x_t.dim() != 4 or x_t.shape[1] != self.in_channels:
            raise ValueError(f"x_t must be (B, {self.in_channels}, H, W), got {tuple(x_t.shape)}")
        if x_t.shape[-2] % self.downsample_factor or x_t.shape[-1] % self.downsample_factor:
            raise ValueError(f"x_t height/width must be multiples of {self.downsample_factor}, "
                             f"got {tuple(x_t.shape[-2:])}")
        levels = tuple(range(self.num_levels)) if feature_levels is None else tuple(feature_levels)
        if any(lvl not in self.feature_channels for lvl in levels):
            raise ValueError(f"feature_levels must lie in [0, {self.num_levels}), got {levels}")
        t = torch.as_tensor(t, device=x_t.device).reshape(-1)
        if t.numel() not in (1, x_t.shape[0]):
            raise ValueError(f"t must hold 1 or {x_t.shape[0]} timesteps, got {t.numel()}")
        t = t.expand(x_t.shape[0])
        h, modality_masked = self._embed_inputs(x_t, channel_mask)
        emb = self.time_mlp(timestep_embedding(t, self.base_channels))
        if self.mask_embedding is not None:
            emb = emb + modality_masked @ self.mask_embedding

        skips = [h]
        for stage, downsample in self.down:
            for res, attn in stage:
                h = attn(res(h, emb))
                skips.append(h)
            if not isinstance(downsample, nn.Identity):
                h = downsample(h)
                skips.append(h)
        h = self.mid_block2(self.mid_attn(self.mid_block1(h, emb)), emb)

        features = {}
        for level, (stage, upsample) in zip(reversed(range(self.num_levels)), self.up):
            for res, attn in stage:
                h = attn(res(torch.cat([h, skips.pop()], dim=1), emb))
            if level in levels:
                features[level] = h
            h = upsample(h)
        eps = self.out(h)
        if return_features:
            return eps, {lvl: features[lvl] for lvl in levels}
        return eps


# ----------------------------------------------------------------------------------------------
# Loss and masking
# ----------------------------------------------------------------------------------------------
def _split_sizes(modality_channels: Mapping[str, int] | Sequence[int]) -> list[int]:
    sizes = list(modality_channels.values()) if isinstance(modality_channels, Mapping) else list(modality_channels)
    if not sizes or any(int(s) < 1 for s in sizes):
        raise ValueError(f"modality_channels must be positive band counts, got {sizes}")
    return [int(s) for s in sizes]


def denoising_loss(eps_pred: Tensor, eps: Tensor, modality_channels: Mapping[str, int] | Sequence[int],
                   weighting: str = "per_modality") -> tuple[Tensor, Tensor]:
    """Modality-balanced epsilon MSE.

    eps_pred, eps (B, C, H, W) with the modalities stacked along C. Returns ``(loss, per_sample)``
    where ``per_sample`` (B, M) is each modality's MSE averaged over its bands and pixels.
    ``weighting="per_modality"`` [R]: loss = mean over modalities of the per-modality MSE, so a
    modality's weight does not depend on its band count. ``"per_channel"``: plain MSE over all
    channels (standard DDPM; a modality weighs by its share of the bands).
    """
    _check_choice("weighting", weighting, LOSS_WEIGHTINGS)
    sizes = _split_sizes(modality_channels)
    if eps_pred.shape != eps.shape or eps.shape[1] != sum(sizes):
        raise ValueError(f"eps_pred {tuple(eps_pred.shape)} and eps {tuple(eps.shape)} must match, "
                         f"with {sum(sizes)} channels")
    sq = (eps_pred - eps).pow(2)
    per_sample = torch.stack([part.flatten(1).mean(dim=1) for part in sq.split(sizes, dim=1)], dim=1)
    if weighting == "per_modality":
        loss = per_sample.mean()
    else:
        loss = sq.mean()
    return loss, per_sample


def draw_channel_mask(modality_mask: Tensor, modality_channels: Mapping[str, int] | Sequence[int],
                      granularity: str = "modality", band_group_fraction: float = 0.5,
                      generator: torch.Generator | None = None) -> Tensor:
    """Expand a per-sample modality mask (B, M) bool to a channel mask (B, C) bool.

    ``granularity="modality"`` [R] hides every band of a masked modality; ``"band_group"``
    (ablation [D]) hides one random contiguous group of ``ceil(fraction * bands)`` of its bands.
    """
    _check_choice("granularity", granularity, MASK_GRANULARITIES)
    if not 0.0 < band_group_fraction <= 1.0:
        raise ValueError(f"band_group_fraction must be in (0, 1], got {band_group_fraction}")
    sizes = _split_sizes(modality_channels)
    if modality_mask.dim() != 2 or modality_mask.shape[1] != len(sizes):
        raise ValueError(f"modality_mask must be (B, {len(sizes)}), got {tuple(modality_mask.shape)}")
    parts = []
    for m, size in enumerate(sizes):
        rows = modality_mask[:, m:m + 1].expand(-1, size)
        if granularity == "band_group":
            group = max(1, math.ceil(band_group_fraction * size))
            start = torch.randint(0, size - group + 1, (modality_mask.shape[0], 1), generator=generator)
            band = torch.arange(size)[None]
            rows = rows & ((band >= start) & (band < start + group)).to(rows.device)
        parts.append(rows)
    return torch.cat(parts, dim=1)


def masked_diffusion_loss(pred: Tensor, noise: Tensor, x0: Tensor, channel_mask: Tensor | None,
                          modality_channels: Mapping[str, int] | Sequence[int], weighting: str = "per_modality",
                          masked_target: str = "x0") -> dict[str, Tensor]:
    """The stage-1 loss of one batch, with hidden (masked) input channels handled by ``masked_target``.

    pred, noise, x0 (B, C, H, W), modalities stacked along C; channel_mask (B, C) bool (None: nothing
    hidden). Visible channels are trained on the usual epsilon target. A hidden channel's noise is
    independent of everything the network sees (its x_t is replaced), so epsilon is no target for it
    (best prediction 0, loss floor 1) [R, spec 4.2 corrected]. Instead:

    - ``"x0"`` (default): the hidden channels' outputs predict the clean x0 (cross-modal
      reconstruction from the visible modalities). Their squared error is divided by the channel's
      variance over the batch (detached, floored at :data:`X0_VARIANCE_FLOOR`), so predicting the
      mean scores 1, the same scale as the epsilon loss whose "predict 0" baseline is 1, whatever the
      DataModule's normalisation [D];
    - ``"none"``: hidden channels add nothing (zero loss and gradient); each modality's loss L_m
      averages over its visible elements only (for whole-modality masking: the samples where m is
      visible), and is 0 when m is hidden in every sample of the batch.

    ``weighting="per_modality"`` [R]: loss = (1/M) sum_m L_m, L_m the mean over the batch's elements of
    modality m that carry a target; ``"per_channel"``: the mean over all such elements.

    Returns ``loss``; ``modality_losses`` (M,) the L_m; ``unmasked_modality_losses`` (M,) the
    epsilon MSE of each modality averaged over the samples where it is fully visible (NaN if none),
    the same quantity under every ``masked_target`` and what the masking controller reads;
    ``masked_modality_losses`` (M,) the variance-normalised x0 MSE of each modality's hidden
    channels averaged over the samples where some are hidden (NaN if none; with ``"none"`` the
    network is not trained on it, and it is still reported as a diagnostic).
    """
    _check_choice("weighting", weighting, LOSS_WEIGHTINGS)
    _check_choice("masked_target", masked_target, MASKED_TARGETS)
    sizes = _split_sizes(modality_channels)
    if not pred.shape == noise.shape == x0.shape or x0.shape[1] != sum(sizes):
        raise ValueError(f"pred {tuple(pred.shape)}, noise {tuple(noise.shape)} and x0 {tuple(x0.shape)} must "
                         f"match, with {sum(sizes)} channels")
    b = x0.shape[0]
    if channel_mask is None:
        channel_mask = torch.zeros(b, x0.shape[1], dtype=torch.bool, device=x0.device)
    hidden = channel_mask[:, :, None, None].expand_as(x0)
    eps_sq = (pred - noise).pow(2)
    x0_var = x0.detach().transpose(0, 1).flatten(1).var(dim=1, unbiased=False)
    x0_sq = (pred - x0).pow(2) / x0_var.clamp(min=X0_VARIANCE_FLOOR).view(1, -1, 1, 1)
    if masked_target == "x0":
        sq, counted = torch.where(hidden, x0_sq, eps_sq), torch.ones_like(hidden)
    else:
        sq, counted = torch.where(hidden, torch.zeros_like(eps_sq), eps_sq), ~hidden

    def per_modality(values: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        """(B, M) sums of values * weights over each modality's elements, and the weights' sums."""
        sums = [(v * w).flatten(1).sum(dim=1) for v, w in zip(values.split(sizes, dim=1), weights.split(sizes, dim=1))]
        counts = [w.flatten(1).sum(dim=1) for w in weights.split(sizes, dim=1)]
        return torch.stack(sums, dim=1), torch.stack(counts, dim=1)

    counted_f = counted.to(sq.dtype)
    sums, counts = per_modality(sq, counted_f)
    modality_losses = sums.sum(dim=0) / counts.sum(dim=0).clamp(min=1)
    if weighting == "per_modality":
        loss = modality_losses.mean()
    else:
        loss = sums.sum() / counts.sum().clamp(min=1)

    def over_samples(per_sample: Tensor, include: Tensor) -> Tensor:
        n = include.sum(dim=0)
        mean = (per_sample * include).sum(dim=0) / n.clamp(min=1)
        return torch.where(n > 0, mean, torch.full_like(mean, float("nan")))

    with torch.no_grad():
        visible = ~torch.stack([part.any(dim=1) for part in channel_mask.split(sizes, dim=1)], dim=1)
        eps_sums, eps_counts = per_modality(eps_sq, torch.ones_like(eps_sq))
        x0_sums, x0_counts = per_modality(x0_sq, hidden.to(x0_sq.dtype))
        unmasked = over_samples(eps_sums / eps_counts, visible)
        masked = over_samples(x0_sums / x0_counts.clamp(min=1), x0_counts > 0)
    return {"loss": loss, "modality_losses": modality_losses.detach(), "unmasked_modality_losses": unmasked,
            "masked_modality_losses": masked}


def ddpm_training_loss(denoiser: MultimodalDenoiserUNet, schedule: DiffusionSchedule, x0: Tensor,
                       channel_mask: Tensor | None = None, weighting: str = "per_modality",
                       generator: torch.Generator | None = None, masked_target: str = "x0") -> dict[str, Tensor]:
    """One sampling-free DDPM training loss: random t, random eps, q_sample, predict, balanced MSE.

    x0 (B, C, H, W) stacked modalities; channel_mask (B, C) bool (input channels hidden from the
    network). The loss and the returned per-modality figures are :func:`masked_diffusion_loss`'s
    (hidden channels predict x0 or add nothing, per ``masked_target``), plus ``t`` (B,).
    """
    b = x0.shape[0]
    t = schedule.sample_timesteps(b, generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    x_t = schedule.q_sample(x0, t, noise)
    pred = denoiser(x_t, t, channel_mask=channel_mask)
    out = masked_diffusion_loss(pred, noise, x0, channel_mask, denoiser.modality_channels, weighting, masked_target)
    out["t"] = t
    return out


class ModalityMaskingController(nn.Module):
    """Per-sample whole-modality masking with probabilities adapted to learning progress.

    Each sample draws one outcome among {no mask, mask modality 1, ..., mask modality M} with
    probabilities (1 - sum p, p_1, ..., p_M): at most one modality is hidden, so all modalities
    are never masked at once [R]. Modes (spec section 4.3): ``"none"`` (p = 0), ``"random_fixed"``
    (p = ``initial_probabilities`` forever) and ``"adaptive"`` [D]:

    - ``step(losses)`` feeds each modality's *unmasked* loss (the stage-1 code feeds the epsilon MSE
      over the samples where the modality is visible: the same quantity under every
      ``masked_target``, never mixed with the masked samples' x0 loss, whose share would follow the
      masking probability itself); an EMA (``ema_momentum``) smooths it;
    - every ``window`` steps, r_m = EMA_m(window start) / EMA_m(now) is modality m's relative
      improvement and rho_m = r_m / mean_{j != m} r_j its imbalance ratio (> 1: m learns faster,
      i.e. dominates);
    - p_m <- clip(p_m + step_size * (rho_m - 1), p_min, p_max), so the faster modality is hidden
      more often and the network must learn the slower one. Probabilities are rescaled if their
      sum would exceed ``max_total``.

    The spec writes the rule for two modalities with a half step for the auxiliary one; the
    symmetric form above (ours) covers any number of modalities. With ``criterion="grad_norm"``
    (OGM-GE-like alternative), ``step`` receives per-modality gradient norms (e.g.
    ``MultimodalDenoiserUNet.stem_gradient_norms()``) and rho_m compares their EMAs directly.

    State lives in buffers (saved with the LightningModule's checkpoint).
    """

    def __init__(self, modality_names: Sequence[str], mode: str = "adaptive",
                 initial_probabilities: Sequence[float] | None = None, ema_momentum: float = 0.99,
                 window: int = 200, step_size: float = 0.05, p_min: float = 0.05, p_max: float = 0.5,
                 max_total: float = 0.9, criterion: str = "loss_progress"):
        super().__init__()
        _check_choice("mode", mode, MASK_MODES)
        _check_choice("criterion", criterion, CRITERIA)
        names = list(modality_names)
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"modality_names must be unique and non-empty, got {names}")
        if mode != "none" and len(names) < 2:
            raise ValueError("mode must be 'none' with a single modality (masking it would hide everything)")
        if initial_probabilities is None:
            initial_probabilities = [0.3] + [0.1] * (len(names) - 1)
        probs = torch.tensor([float(p) for p in initial_probabilities], dtype=torch.float64)
        if probs.numel() != len(names):
            raise ValueError(f"initial_probabilities needs {len(names)} values, got {probs.numel()}")
        if not 0.0 <= p_min <= p_max <= 1.0:
            raise ValueError(f"need 0 <= p_min <= p_max <= 1, got p_min={p_min}, p_max={p_max}")
        if not 0.0 < max_total <= 1.0 or (mode != "none" and float(probs.sum()) > max_total):
            raise ValueError(f"initial_probabilities sum {float(probs.sum()):.3f} must be "
                             f"<= max_total={max_total} <= 1")
        if (probs < 0).any():
            raise ValueError("initial_probabilities must be non-negative")
        if not 0.0 <= ema_momentum < 1.0 or window < 1 or step_size < 0:
            raise ValueError("need 0 <= ema_momentum < 1, window >= 1 and step_size >= 0")
        self.modality_names = names
        self.mode, self.criterion = mode, criterion
        self.ema_momentum, self.window, self.step_size = ema_momentum, window, step_size
        self.p_min, self.p_max, self.max_total = p_min, p_max, max_total
        m = len(names)
        self.register_buffer("probs", torch.zeros(m, dtype=torch.float64) if mode == "none" else probs)
        self.register_buffer("ema", torch.full((m,), float("nan"), dtype=torch.float64))
        self.register_buffer("window_start", torch.full((m,), float("nan"), dtype=torch.float64))
        self.register_buffer("rho", torch.ones(m, dtype=torch.float64))
        self.register_buffer("steps_in_window", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @property
    def probabilities(self) -> dict[str, float]:
        """Current masking probability of each modality, {name: p}."""
        return {n: float(p) for n, p in zip(self.modality_names, self.probs)}

    def log_state(self) -> dict[str, float]:
        """Flat dict for loggers: p_mask/<m>, ema_loss/<m>, rho/<m>."""
        out = {}
        for i, n in enumerate(self.modality_names):
            out[f"p_mask/{n}"] = float(self.probs[i])
            out[f"ema_loss/{n}"] = float(self.ema[i])
            out[f"rho/{n}"] = float(self.rho[i])
        return out

    def sample_mask(self, batch_size: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """Draw per-sample modality masks, (batch_size, M) bool with at most one True per row."""
        m = len(self.modality_names)
        outcome_probs = torch.cat([(1 - self.probs.sum()).clamp(min=0).view(1), self.probs]).float()
        outcome = torch.multinomial(outcome_probs.cpu(), batch_size, replacement=True, generator=generator)
        mask = F.one_hot(outcome, m + 1)[:, 1:].bool()
        return mask.to(device) if device is not None else mask

    @torch.no_grad()
    def step(self, values: Tensor | Mapping[str, float] | Sequence[float]) -> dict[str, float]:
        """Feed one step's per-modality losses (or gradient norms); returns the probabilities.

        NaN entries (modality masked in every sample of the batch) leave that EMA unchanged.
        """
        if isinstance(values, Mapping):
            values = [float(values[n]) for n in self.modality_names]
        v = torch.as_tensor(values, dtype=torch.float64).detach().cpu().reshape(-1)
        if v.numel() != len(self.modality_names):
            raise ValueError(f"step expects {len(self.modality_names)} values, got {v.numel()}")
        seen = ~torch.isnan(v)
        first = torch.isnan(self.ema) & seen
        blended = self.ema_momentum * self.ema + (1 - self.ema_momentum) * v
        self.ema.copy_(torch.where(first, v, torch.where(seen, blended, self.ema)))
        if torch.isnan(self.window_start).any():
            # the window opens once every modality has been observed
            if not torch.isnan(self.ema).any():
                self.window_start.copy_(self.ema)
                self.steps_in_window.zero_()
            return self.probabilities
        self.steps_in_window += 1
        if int(self.steps_in_window) >= self.window:
            self._update()
        return self.probabilities

    def _update(self) -> None:
        eps = 1e-12
        if self.criterion == "loss_progress":
            speed = self.window_start.clamp(min=eps) / self.ema.clamp(min=eps)
        else:
            speed = self.ema.clamp(min=eps)
        m = speed.numel()
        others_mean = (speed.sum() - speed) / (m - 1) if m > 1 else speed
        self.rho.copy_(speed / others_mean.clamp(min=eps))
        if self.mode == "adaptive":
            probs = (self.probs + self.step_size * (self.rho - 1)).clamp(self.p_min, self.p_max)
            total = probs.sum()
            if total > self.max_total:
                probs = probs * (self.max_total / total)
            self.probs.copy_(probs)
        self.window_start.copy_(self.ema)
        self.steps_in_window.zero_()
        self.num_updates += 1


# ----------------------------------------------------------------------------------------------
# Stage 1b: diffusion feature cube over a whole scene
# ----------------------------------------------------------------------------------------------
def scene_noise(channels: int, height: int, width: int, seed: int) -> Tensor:
    """The fixed noise field eps (C, H, W) for a scene: depends only on the seed and the shape.

    One field for the whole scene (each tile crops its window of it), so every pixel sees the same
    eps whatever the tiling, and the same field is used for every timestep ("shared noise").
    """
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(channels, height, width, generator=generator)


def feature_cube_channels(denoiser: MultimodalDenoiserUNet, levels: Sequence[int] = (0, 1, 2),
                          num_timesteps: int = 1, timestep_reduction: str = "mean") -> dict[int, int]:
    """{level: channels} of the blocks of an ``extract_feature_cube`` output, in cube order.

    ``torch.split(cube, list(feature_cube_channels(...).values()))`` gives the per-level cubes.
    """
    _check_choice("timestep_reduction", timestep_reduction, TIMESTEP_REDUCTIONS)
    if not levels or any(lvl not in denoiser.feature_channels for lvl in levels):
        raise ValueError(f"levels must be non-empty and in {sorted(denoiser.feature_channels)}, got {tuple(levels)}")
    factor = num_timesteps if timestep_reduction == "concat" else 1
    return {lvl: denoiser.feature_channels[lvl] * factor for lvl in levels}


def _tile_origins(size: int, tile: int, stride: int) -> list[int]:
    return list(range(0, size - tile + 1, stride))


def _padded_size(size: int, tile: int, stride: int) -> int:
    if size <= tile:
        return tile
    return tile + math.ceil((size - tile) / stride) * stride


def _blend_weights(tile: int, origin: int, padded: int, overlap: int, blend: str) -> Tensor:
    """1-D stitching weights of one tile along one axis."""
    w = torch.ones(tile)
    if blend == "center":
        lo, hi = overlap // 2, overlap - overlap // 2
        if origin > 0:
            w[:lo] = 0
        if origin + tile < padded:
            w[tile - hi:] = 0
    return w


@torch.no_grad()
def extract_feature_cube(denoiser: MultimodalDenoiserUNet, schedule: DiffusionSchedule,
                         modalities: Mapping[str, Tensor], timesteps: Sequence[int] = (50, 150),
                         levels: Sequence[int] = (0, 1, 2), tile: int = 32, overlap: int = 16,
                         batch_size: int = 16, seed: int = 0, blend: str = "mean",
                         timestep_reduction: str = "mean", dtype: torch.dtype = torch.float32,
                         progress: Callable[[int, int], None] | None = None) -> Tensor:
    """Frozen-denoiser features of a whole scene, computed in overlapping tiles and stitched.

    ``modalities`` maps every modality name of the denoiser to a (C_m, H, W) tensor on a common
    grid (already normalised as in training). For each tile and each timestep t in ``timesteps``:
    x_t = q_sample(x0, t, eps) with eps from ``scene_noise(C, H, W, seed)``, one UNet pass (no
    masking), the decoder maps of ``levels`` upsampled bilinearly to tile resolution. Timesteps
    are averaged (``timestep_reduction="mean"`` [D]) or concatenated (``"concat"``), and tiles are
    stitched with ``blend="mean"`` (uniform average in overlaps, spec default [D]) or
    ``"center"`` (each pixel taken from the tile(s) where it lies at least ``overlap // 2`` from
    an inner tile edge, which equals an untiled pass when the network is local and its receptive
    field radius is at most ``overlap // 2``).

    The scene is reflect-padded at the bottom/right to a whole number of tiles, and cropped back.
    ``tile`` and the stride ``tile - overlap`` must be multiples of ``denoiser.downsample_factor``
    so every tile sits on the same down-sampling grid as an untiled pass.
    ``progress(done, total)`` is called once per finished tile, if given.

    Returns (F, H, W) in ``dtype`` on the CPU; channels are the levels in the order given, each
    ``denoiser.feature_channels[level]`` wide (times ``len(timesteps)`` when concatenating, with
    the timesteps consecutive inside a level): see :func:`feature_cube_channels`.
    """
    _check_choice("blend", blend, BLENDS)
    _check_choice("timestep_reduction", timestep_reduction, TIMESTEP_REDUCTIONS)
    names = denoiser.modality_names
    if set(modalities) != set(names):
        raise ValueError(f"modalities must have exactly the keys {names}, got {sorted(modalities)}")
    shapes = {n: tuple(modalities[n].shape) for n in names}
    if any(len(s) != 3 for s in shapes.values()) or len({s[1:] for s in shapes.values()}) != 1:
        raise ValueError(f"modalities must be (C, H, W) tensors on a common grid, got {shapes}")
    for n in names:
        if shapes[n][0] != denoiser.modality_channels[n]:
            raise ValueError(f"modality {n!r} has {shapes[n][0]} bands, the denoiser expects "
                             f"{denoiser.modality_channels[n]}")
    if not timesteps or any(not 0 <= int(t) < schedule.num_timesteps for t in timesteps):
        raise ValueError(f"timesteps must be non-empty and in [0, {schedule.num_timesteps}), got {tuple(timesteps)}")
    level_width = feature_cube_channels(denoiser, levels, len(timesteps), timestep_reduction)
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must satisfy 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
    factor = denoiser.downsample_factor
    if tile % factor or (tile - overlap) % factor:
        raise ValueError(f"tile ({tile}) and tile - overlap ({tile - overlap}) must be multiples of "
                         f"the denoiser's downsample factor {factor}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    param = next(denoiser.parameters())
    device = param.device
    x0 = torch.cat([modalities[n].float().cpu() for n in names], dim=0)
    channels, height, width = x0.shape
    noise = scene_noise(channels, height, width, seed)
    stride = tile - overlap
    ph, pw = _padded_size(height, tile, stride), _padded_size(width, tile, stride)
    if (ph, pw) != (height, width):
        pad = (0, pw - width, 0, ph - height)
        mode = "reflect" if ph - height < height and pw - width < width else "replicate"
        x0 = F.pad(x0[None], pad, mode=mode)[0]
        noise = F.pad(noise[None], pad, mode=mode)[0]

    total_channels = sum(level_width.values())
    acc = torch.zeros(total_channels, ph, pw)
    weight = torch.zeros(ph, pw)
    origins = [(y, x) for y in _tile_origins(ph, tile, stride) for x in _tile_origins(pw, tile, stride)]
    was_training = denoiser.training
    denoiser.eval()
    try:
        for start in range(0, len(origins), batch_size):
            chunk = origins[start:start + batch_size]
            clean = torch.stack([x0[:, y:y + tile, x:x + tile] for y, x in chunk]).to(device)
            eps = torch.stack([noise[:, y:y + tile, x:x + tile] for y, x in chunk]).to(device)
            per_t = []
            for t in timesteps:
                tt = torch.full((len(chunk),), int(t), dtype=torch.long, device=device)
                _, feats = denoiser(schedule.q_sample(clean, tt, eps), tt, return_features=True,
                                    feature_levels=levels)
                per_t.append([F.interpolate(feats[lvl].float(), size=(tile, tile), mode="bilinear",
                                            align_corners=False) for lvl in levels])
            if timestep_reduction == "mean":
                stacked = torch.cat([torch.stack([f[i] for f in per_t]).mean(dim=0) for i in range(len(levels))], dim=1)
            else:
                stacked = torch.cat([torch.cat([f[i] for f in per_t], dim=1) for i in range(len(levels))], dim=1)
            stacked = stacked.cpu()
            for k, (y, x) in enumerate(chunk):
                w = (_blend_weights(tile, y, ph, overlap, blend)[:, None]
                     * _blend_weights(tile, x, pw, overlap, blend)[None])
                acc[:, y:y + tile, x:x + tile] += stacked[k] * w
                weight[y:y + tile, x:x + tile] += w
                if progress is not None:
                    progress(start + k + 1, len(origins))
    finally:
        denoiser.train(was_training)
    return (acc / weight.clamp(min=1e-12))[:, :height, :width].to(dtype)
