"""BDGF stage 1: the multimodal DDPM with adaptive modality masking, trained by the Trainer.

- :class:`BDGFDiffusion` -- denoiser, its EMA (``torch.optim.swa_utils.AveragedModel``), noise
  schedule and modality-masking controller.
- :class:`BDGFPretrain` -- the LightningModule: a run of its own (``lightning fit --config
  configs/bdgf_pretrain_synthetic.yaml``) over unlabelled scene tiles, whose checkpoints carry the
  EMA denoiser in the form :class:`~rsfusion.lightning_modules.bdgf.BDGF` reads (``ddpm_checkpoint``).
- :func:`pretrain_ddpm` -- the same module fitted by a Trainer on given arrays; BDGF's one-command
  route calls it on every DDP rank under the outer run's strategy (no rank waits for another's
  training: each trains its share of the tiles, gradients are all-reduced every step).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import pickle
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from rsfusion.datamodules.errors import InputError
from rsfusion.datamodules.pretrain_tiles import RandomSceneTiles
from rsfusion.lightning_modules.base import Batch, FusionTask
from rsfusion.lightning_modules.networks.bdgf_diffusion import (
    MASKED_TARGETS,
    DiffusionSchedule,
    MultimodalDenoiserUNet,
    _check_choice,
    ddpm_training_loss,
    draw_channel_mask,
)

__all__ = ["BDGFDiffusion", "BDGFPretrain", "ModalityMaskingController", "DDPM_DEFAULTS", "STAGE1_OBJECTIVE_VERSION",
           "denoiser_from_payload",
           "load_ddpm_payload", "payload_digest", "pretrain_ddpm", "resolve_ddpm_config"]

PAYLOAD_FORMAT = "rsfusion-bdgf-ddpm-v2"
# Payload formats load_ddpm_payload reads. v1 DDPMs were trained with the masked modality's
# epsilon as target (pure noise: docs/models/bdgf.md before its correction); they still load, with a warning.
READABLE_PAYLOAD_FORMATS = ("rsfusion-bdgf-ddpm-v1", PAYLOAD_FORMAT)
# Version of the stage-1 training objective, part of the DDPM cache key: bump it whenever a code
# change alters what pretraining learns, so a DDPM cached by older code is never reused.
# 2: masked modalities predict x0 or add no loss (masked_target), never their hidden epsilon.
STAGE1_OBJECTIVE_VERSION = 2

# The multimodal DDPM's configuration (docs/models/bdgf.md; all [D] except where noted). Keys of a
# ``ddpm`` dict override these; unknown keys are an error.
DDPM_DEFAULTS: dict[str, Any] = {
    # denoiser: guided-diffusion style UNet (docs/models/bdgf.md)
    "base_channels": 64, "channel_mult": [1, 2, 2], "num_res_blocks": 2, "attention_levels": [2],
    "attention_heads": 4, "dropout": 0.1, "stem_channels": 32, "norm": "group", "norm_groups": 32,
    "time_embed_mult": 4, "mask_fill": "learned", "mask_indicator": "channel",
    # noise schedule: Ho et al. (docs/models/bdgf.md)
    "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "schedule": "linear",
    # adaptive modality masking (docs/models/bdgf.md [R] mechanism, [D] numbers) and its ablation switches (4.3)
    "mask_mode": "adaptive", "initial_probabilities": None, "mask_ema_momentum": 0.99, "mask_window": 200,
    "mask_step_size": 0.05, "p_min": 0.05, "p_max": 0.5, "max_total": 0.9, "criterion": "loss_progress",
    "loss_weighting": "per_modality", "mask_granularity": "modality", "band_group_fraction": 0.5,
    # what a masked modality's outputs are trained on (docs/models/bdgf.md [R]): x0 | none
    "masked_target": "x0",
}
DENOISER_KEYS = ("base_channels", "channel_mult", "num_res_blocks", "attention_levels", "attention_heads",
                  "dropout", "stem_channels", "norm", "norm_groups", "time_embed_mult", "mask_fill", "mask_indicator")


def resolve_ddpm_config(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """:data:`DDPM_DEFAULTS` updated with ``overrides`` (JSON-friendly: sequences become lists)."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(DDPM_DEFAULTS))
    if unknown:
        raise ValueError(f"ddpm: unknown keys {unknown}; known keys: {sorted(DDPM_DEFAULTS)}")
    config = {**DDPM_DEFAULTS, **overrides}
    if config["masked_target"] not in MASKED_TARGETS:
        raise ValueError(f"ddpm.masked_target must be one of {MASKED_TARGETS}, got {config['masked_target']!r}")
    return {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in config.items()}


# ----------------------------------------------------------------------------------------------
# Stage 1 core, shared by the Lightning module and the in-process loop
# ----------------------------------------------------------------------------------------------
MASK_MODES = ("none", "random_fixed", "adaptive")
CRITERIA = ("loss_progress", "grad_norm")


class ModalityMaskingController(nn.Module):
    """Per-sample whole-modality masking with probabilities adapted to learning progress.

    Each sample draws one outcome among {no mask, mask modality 1, ..., mask modality M} with
    probabilities (1 - sum p, p_1, ..., p_M): at most one modality is hidden, so all modalities
    are never masked at once [R]. Modes (docs/models/bdgf.md): ``"none"`` (p = 0), ``"random_fixed"``
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

    The reconstruction writes the rule for two modalities with a half step for the auxiliary one; the
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


def ema_with_warmup(decay: float):
    """``get_ema_multi_avg_fn`` whose decay warms up as min(decay, (1 + n) / (10 + n)) after n averages,
    so a short run's EMA is not dominated by the first weights."""
    def average(ema_params, params, num_averaged) -> None:
        n = int(num_averaged)
        get_ema_multi_avg_fn(min(decay, (1 + n) / (10 + n)))(ema_params, params, num_averaged)
    return average


class BDGFDiffusion(nn.Module):
    """The stage-1 state: denoiser, its EMA copy, noise schedule and modality-masking controller.

    ``modality_channels`` {name: bands} in stacking order (the first is the spectral image, whose
    masking probability starts higher: 0.3 vs 0.1 [D]); ``config`` as :func:`resolve_ddpm_config`.
    """

    def __init__(self, modality_channels: Mapping[str, int], config: Mapping[str, Any] | None = None,
                 ema_decay: float = 0.999):
        super().__init__()
        cfg = resolve_ddpm_config(config)
        self.config = cfg
        self.modality_channels = {n: int(c) for n, c in modality_channels.items()}
        self.denoiser = MultimodalDenoiserUNet(self.modality_channels, **{k: cfg[k] for k in DENOISER_KEYS})
        # the library's EMA of the weights (and buffers), with the usual warm-up of the decay
        self.ema = AveragedModel(self.denoiser, multi_avg_fn=ema_with_warmup(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        self.schedule = DiffusionSchedule(cfg["num_timesteps"], cfg["beta_start"], cfg["beta_end"], cfg["schedule"])
        single = len(self.modality_channels) == 1
        self.masking = ModalityMaskingController(
            list(self.modality_channels), mode="none" if single else cfg["mask_mode"],
            initial_probabilities=cfg["initial_probabilities"], ema_momentum=cfg["mask_ema_momentum"],
            window=cfg["mask_window"], step_size=cfg["mask_step_size"], p_min=cfg["p_min"], p_max=cfg["p_max"],
            max_total=cfg["max_total"], criterion=cfg["criterion"])

    def stack(self, modalities: Mapping[str, Tensor]) -> Tensor:
        """{name: (B, C_m, H, W)} -> (B, C, H, W) in the denoiser's modality order."""
        return torch.cat([modalities[n].float() for n in self.modality_channels], dim=1)

    def training_loss(self, x0: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Masked, modality-balanced DDPM loss of a batch of clean tiles x0 (B, C, H, W).

        With ``criterion="loss_progress"`` the controller is fed each modality's epsilon loss over
        the samples where it is visible (``unmasked_modality_losses``). That figure means the same
        under ``masked_target`` x0 and none; the masked samples' x0 loss is left out because its
        share of the batch follows the masking probability being adapted (a feedback loop) and
        it measures cross-modal reconstruction, not how well the modality itself is learned.
        """
        cfg = self.config
        channel_mask = None
        if self.masking.mode != "none":
            modality_mask = self.masking.sample_mask(x0.shape[0], generator=generator)
            channel_mask = draw_channel_mask(modality_mask, self.modality_channels, cfg["mask_granularity"],
                                             cfg["band_group_fraction"], generator=generator).to(x0.device)
        out = ddpm_training_loss(self.denoiser, self.schedule, x0, channel_mask, cfg["loss_weighting"], generator,
                                 masked_target=cfg["masked_target"])
        if self.masking.criterion == "loss_progress":
            self.masking.step(out["unmasked_modality_losses"])
        return out

    def after_backward(self) -> None:
        """Feed the controller with stem gradient norms (``criterion="grad_norm"``, OGM-GE-like)."""
        if self.masking.criterion == "grad_norm":
            self.masking.step(self.denoiser.stem_gradient_norms())

    def payload(self) -> dict[str, Any]:
        """What a BDGF needs to rebuild the frozen EMA denoiser: config, modalities, weights."""
        return {"format": PAYLOAD_FORMAT, "objective": STAGE1_OBJECTIVE_VERSION, "config": dict(self.config),
                "modality_channels": dict(self.modality_channels),
                "state_dict": {k: v.detach().cpu().clone() for k, v in self.ema.module.state_dict().items()},
                "masking": self.masking.probabilities, "ema_updates": int(self.ema.n_averaged)}


def denoiser_from_payload(payload: Mapping[str, Any]) -> tuple[MultimodalDenoiserUNet, DiffusionSchedule]:
    """The frozen EMA denoiser of a payload (in eval mode) and its noise schedule."""
    cfg = resolve_ddpm_config(payload["config"])
    # the random init is overwritten; fork the RNG so that building the bank or reading it from the
    # cache leaves the training run's random stream identical
    with torch.random.fork_rng(devices=[]):
        denoiser = MultimodalDenoiserUNet(payload["modality_channels"], **{k: cfg[k] for k in DENOISER_KEYS})
    denoiser.load_state_dict(payload["state_dict"])
    schedule = DiffusionSchedule(cfg["num_timesteps"], cfg["beta_start"], cfg["beta_end"], cfg["schedule"])
    return denoiser.eval().requires_grad_(False), schedule


def payload_digest(payload: Mapping[str, Any]) -> str:
    """SHA-256 of a DDPM payload's configuration, modalities and weights (the DDPM's identity)."""
    h = hashlib.sha256(json.dumps([payload["config"], payload["modality_channels"]], sort_keys=True).encode())
    for name in sorted(payload["state_dict"]):
        t = payload["state_dict"][name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def load_ddpm_payload(path: str | Path) -> dict[str, Any]:
    """Read a DDPM from a cached DDPM file or from a :class:`BDGFPretrain` / :class:`BDGF` checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: ddpm_checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read the DDPM checkpoint ({str(err).splitlines()[0]})") from None
    payload = None
    if isinstance(obj, dict) and obj.get("format") in READABLE_PAYLOAD_FORMATS:
        payload = obj
    elif isinstance(obj, dict) and isinstance(obj.get("bdgf_ddpm"), dict):
        payload = obj["bdgf_ddpm"]
    if payload is not None:
        if "masked_target" not in payload.get("config", {}):
            rank_zero_warn(f"{path}: this DDPM was pre-trained before the stage-1 fix (its masked modality was "
                           "trained on pure noise); pre-train it again for the corrected objective")
        return payload
    raise InputError(f"{path}: not a BDGF DDPM (expected a BDGFPretrain/BDGF .ckpt or a cached DDPM .pt)")


# ----------------------------------------------------------------------------------------------
# Stage 1 as a LightningModule
# ----------------------------------------------------------------------------------------------
class BDGFPretrain(FusionTask):
    """BDGF stage 1: the multimodal DDPM with adaptive modality masking, on unlabelled scene tiles.

    Labels are not used: it trains on the DataModule's unlabelled tiles (``data.pretrain_tiles:
    {tile: 32, per_epoch: 6400}``: random crops with flips/rot90 of the whole normalised scene,
    :class:`~rsfusion.datamodules.pretrain_tiles.RandomSceneTiles`; the tile side a multiple of the
    UNet's downsample factor). Validation reports the
    EMA denoiser's unmasked loss ``val/ddpm_loss`` on the validation patches (fixed noise). Logged
    every optimiser step: the masking probabilities ``train/p_mask/<modality>``, the controller's
    EMA losses and imbalance ratios (``train/ema_loss/<m>``, ``train/rho/<m>``), each modality's
    loss term ``train/loss_<m>``, its epsilon loss where visible ``train/eps_loss_visible/<m>`` (what
    the controller reads) and its variance-normalised x0 loss where masked
    ``train/x0_loss_masked/<m>`` (below 1 = better than predicting the mean). Checkpoints hold the EMA denoiser in
    ``checkpoint["bdgf_ddpm"]``
    for :class:`BDGF`'s ``ddpm_checkpoint``.

    Args:
        ddpm: overrides of :data:`DDPM_DEFAULTS` (architecture, schedule, masking).
        ema_decay: EMA of the weights (0.999 [D]).
        lr, weight_decay, scheduler: AdamW 1e-4, no decay, constant lr [D]; gradient
            clipping (1.0 [D]) is the Trainer's ``gradient_clip_val``.
        **kwargs: :class:`~rsfusion.lightning_modules.base.FusionTask` arguments (the linked in_channels, ...).
    """

    samplings = frozenset({"pixel", "tile"})

    def __init__(self, ddpm: dict[str, Any] | None = None, ema_decay: float = 0.999, dense: bool = False,
                 lr: float = 1e-4, weight_decay: float = 0.0,
                 scheduler: Literal["cosine", "step_decay", "none"] = "none", **kwargs):
        super().__init__(dense=dense, lr=lr, weight_decay=weight_decay, scheduler=scheduler, **kwargs)
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.diffusion = BDGFDiffusion(self.in_channels, ddpm, ema_decay)

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        return [{"params": list(self.diffusion.denoiser.parameters()), "weight_decay": weight_decay}]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self._trainer is not None and self.trainer.datamodule is not None:
            self.check_tiles(self.trainer.datamodule.train_dataset)

    def check_tiles(self, dataset) -> None:
        """The training set must be unlabelled tiles whose side the UNet can halve at every level."""
        if not isinstance(dataset, RandomSceneTiles):
            raise InputError("BDGFPretrain trains on unlabelled scene tiles: set data.pretrain_tiles, e.g. "
                             "{tile: 32, per_epoch: 6400}")
        factor = self.diffusion.denoiser.downsample_factor
        if dataset.tile < factor or dataset.tile % factor:
            raise InputError(f"pretrain_tiles.tile ({dataset.tile}) must be a multiple of the denoiser's downsample "
                             f"factor {factor}")
        rank_zero_info(f"BDGFPretrain: training the DDPM on random {dataset.tile}x{dataset.tile} tiles of the whole "
                       f"scene ({len(dataset)} tiles per epoch)")

    def forward(self, batch: Batch) -> Tensor:
        """Noise prediction of the training denoiser for clean tiles at a random timestep (B, C, H, W)."""
        x0 = batch["x0"] if "x0" in batch else self.diffusion.stack({n: batch[n] for n in self.in_channels})
        t = self.diffusion.schedule.sample_timesteps(x0.shape[0], device=x0.device)
        return self.diffusion.denoiser(self.diffusion.schedule.q_sample(x0, t, torch.randn_like(x0)), t)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        x0 = batch["x0"]
        out = self.diffusion.training_loss(x0)
        size = x0.shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=size)
        for i, name in enumerate(self.diffusion.modality_channels):
            self.log(f"train/loss_{name}", out["modality_losses"][i], batch_size=size)
            for key, figure in (("eps_loss_visible", "unmasked_modality_losses"),
                                ("x0_loss_masked", "masked_modality_losses")):
                value = out[figure][i]
                if torch.isfinite(value):  # NaN when no sample of the batch had it visible / masked
                    self.log(f"train/{key}/{name}", value, batch_size=size)
        state = self.diffusion.masking.log_state()
        self.log_dict({f"train/{k}": v for k, v in state.items() if math.isfinite(v)}, batch_size=size)
        return out["loss"]

    def on_after_backward(self) -> None:
        self.diffusion.after_backward()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.diffusion.ema.update_parameters(self.diffusion.denoiser)

    def _eval_loss(self, batch: Batch, batch_idx: int) -> tuple[Tensor, int]:
        x0 = self.diffusion.stack({n: batch[n] for n in self.in_channels})
        factor = self.diffusion.denoiser.downsample_factor
        h, w = (x0.shape[-2] // factor) * factor, (x0.shape[-1] // factor) * factor
        if h == 0 or w == 0:
            raise InputError(f"BDGFPretrain: evaluation patches of {tuple(x0.shape[-2:])} are smaller than the "
                             f"denoiser's downsample factor {factor}; use data.patch_size >= {factor}")
        x0 = x0[..., :h, :w]
        generator = torch.Generator().manual_seed(batch_idx)
        out = ddpm_training_loss(self.diffusion.ema.module, self.diffusion.schedule, x0, None,
                                 self.diffusion.config["loss_weighting"], generator)
        return out["loss"], x0.shape[0]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        loss, size = self._eval_loss(batch, batch_idx)
        self.log("val/ddpm_loss", loss, prog_bar=True, batch_size=size)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        loss, size = self._eval_loss(batch, batch_idx)
        self.log("test/ddpm_loss", loss, batch_size=size)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["bdgf_ddpm"] = self.diffusion.payload()



def pretrain_ddpm(modalities: Mapping[str, np.ndarray | Tensor], config: Mapping[str, Any] | None = None,
                  steps: int = 30000, batch_size: int = 64, lr: float = 1e-4, tile: int = 32,
                  ema_decay: float = 0.999, grad_clip: float = 1.0, seed: int = 0,
                  like: L.Trainer | None = None, log_dir: str | Path | None = None) -> dict[str, Any]:
    """Stage 1 on given arrays: :class:`BDGFPretrain` fitted by a Trainer; returns the DDPM payload (EMA weights).

    ``modalities`` {name: (C_m, H, W)} normalised, unpadded, on a common grid. AdamW (weight decay
    0), gradient clipping, EMA of the weights, random flipped/rotated tiles [D];
    ``steps`` optimiser steps. ``like``: a running Trainer whose accelerator, devices, nodes and
    strategy (class, process-group backend and timeout) the stage-1 Trainer takes over: called on every
    rank of a DDP run, all ranks train together (each on its own tiles, seeded ``seed + rank``).
    Deterministic for a given ``seed`` and process count; the global RNG is restored afterwards.
    ``log_dir``: where the stage-1 run's CSV log goes (masking probabilities, losses); None: no log.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"pretrain_steps and pretrain_batch_size must be >= 1, got {steps}, {batch_size}")
    channels = {n: int(np.shape(a)[0]) for n, a in modalities.items()}
    scene = torch.cat([torch.as_tensor(np.asarray(a), dtype=torch.float32) for a in modalities.values()], dim=0)
    rank = like.global_rank if like is not None else 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same initial weights on every rank
        module = BDGFPretrain(ddpm=dict(config or {}), ema_decay=ema_decay, lr=lr, in_channels=channels)
        torch.manual_seed(seed + rank)  # other tiles, timesteps, noise and masks on each rank
        tiles = RandomSceneTiles(scene, tile, steps * batch_size)
        module.check_tiles(tiles)
        tiles = DataLoader(tiles, batch_size=batch_size)
        logger = L.pytorch.loggers.CSVLogger(str(log_dir), name="", version="") if log_dir else False
        with _without_banner():  # the outer run has printed Lightning's device banner already
            trainer = L.Trainer(max_steps=steps, max_epochs=-1, gradient_clip_val=grad_clip or None, logger=logger,
                                log_every_n_steps=max(1, steps // 50), enable_checkpointing=False,
                                enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
                                limit_val_batches=0, **_same_processes(like))
        start = time.perf_counter()
        trainer.fit(module, train_dataloaders=tiles)
    probs = ", ".join(f"{n} {p:.3f}" for n, p in module.diffusion.masking.probabilities.items())
    timeout = getattr(trainer.strategy, "_timeout", None) if trainer.world_size > 1 else None
    rank_zero_info(f"BDGF stage 1: {steps} steps done on {trainer.world_size} process(es) in "
                   f"{time.perf_counter() - start:.1f} s" + (f" (process-group timeout {timeout})" if timeout else "")
                   + f", p_mask [{probs}]")
    return module.diffusion.payload()


@contextlib.contextmanager
def _without_banner():
    """Lightning's info lines (device banner, tips) off while a Trainer is built; warnings still show."""
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = log.level
    log.setLevel(max(logging.WARNING, level))
    try:
        yield
    finally:
        log.setLevel(level)


def _same_processes(like: L.Trainer | None) -> dict[str, Any]:
    """Trainer arguments that put a stage-1 Trainer on the processes and devices of the running ``like``."""
    if like is None:
        return {"accelerator": "cpu", "devices": 1}
    indices = [d.index for d in getattr(like.strategy, "parallel_devices", None) or [like.strategy.root_device]]
    devices = indices if None not in indices else len(indices)  # the same GPUs, or as many CPU processes
    args = {"accelerator": like.accelerator, "devices": devices, "num_nodes": like.num_nodes}
    if like.world_size == 1:
        return args

    if not isinstance(like.strategy, DDPStrategy):
        raise InputError(f"BDGF's in-process pretraining runs under DDP or one process, not "
                         f"{type(like.strategy).__name__}: pre-train with BDGFPretrain and give ddpm_checkpoint")
    # the masking fill of a modality no sample of a batch masks gets no gradient: find unused parameters
    strategy = DDPStrategy(process_group_backend=like.strategy._process_group_backend,
                           timeout=like.strategy._timeout, find_unused_parameters=True)
    return {**args, "strategy": strategy}
