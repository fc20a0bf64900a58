"""BDGF's multimodal DDPM: noise schedule, denoiser UNet and its masked, modality-balanced loss.

BDGF (Liu et al., arXiv 2509.23310) pre-trains a multimodal DDPM with an *adaptive modality
masking* strategy so that the learned distribution is not dominated by the spectral image, then
uses the frozen denoiser's features to guide a three-branch classifier (see ``bdgf.py``).

Only the skeleton is the paper's (abstract; the code it announces at github.com/HaoLiu-XDU/BDGF was
not available to this project, and nothing here has been compared with it): a multimodal DDPM, adaptive modality
masking, and
diffusion features hierarchically guiding CNN/Mamba/Transformer branches. Everything below the
skeleton is a reconstruction [R] or an rsfusion default [D] from docs/models/bdgf.md; every such
number is a constructor/function argument:

- schedule: T=1000, linear betas 1e-4..0.02, eps-prediction, MSE (Ho et al.) [D];
- denoiser: guided-diffusion style 2-D UNet, base 64, mult (1, 2, 2), 2 res-blocks per level,
  GroupNorm(32)+SiLU, sinusoidal time embedding -> MLP (4 x base), self-attention at the deepest
  level (8x8 for 32x32 tiles), dropout 0.1 [D]; per-modality 1x1 input stems (32 ch each) [D];
- masking: whole modalities on the UNet input, learned per-channel fill value, indicator channel
  per modality stem, loss averaged per modality [R]; a masked modality's outputs predict its clean
  x0 (``masked_target="x0"``, variance-normalised MSE) or add no loss (``"none"``), never its
  noise, which the network cannot see [R]; adaptation from relative progress of
  the visible-sample epsilon loss with EMA 0.99, windows of 200 steps, eta 0.05, p in [0.05, 0.5],
  start (0.3, 0.1) [D];
- features: timesteps {50, 150} averaged, the three decoder levels, bilinear upsampling to tile
  resolution, tiles stitched with 50 % overlap [D].

The masking controller lives with stage 1 (``rsfusion/lightning_modules/bdgf_pretrain.py``) and the
feature extraction with stage 2 (``rsfusion/lightning_modules/bdgf_features.py``): this module holds networks
and their losses only.

Decoder levels are numbered from 0 = full resolution (shallowest, the reconstruction's "level-1 32x32") to
``len(channel_mult) - 1`` = deepest (the reconstruction's "level-3 8x8").
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DiffusionSchedule",
    "MultimodalDenoiserUNet",
    "denoising_loss",
    "masked_diffusion_loss",
    "draw_channel_mask",
    "ddpm_training_loss",
]

SCHEDULES = ("linear", "cosine")
LOSS_WEIGHTINGS = ("per_channel", "per_modality")
MASK_GRANULARITIES = ("modality", "band_group")
MASK_FILLS = ("learned", "noise")
MASK_INDICATORS = ("channel", "embedding", "both")
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

    Architecture defaults are rsfusion's [D] (guided-diffusion style, docs/models/bdgf.md).
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
    (best prediction 0, loss floor 1) [R]. Instead:

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
