"""BDGF (Liu et al., arXiv 2509.23310) end to end: DDPM pre-training, feature bank, guided classifier.

Two LightningModules on the suite's :class:`~rsfusion.datamodules.raster.RasterDataModule`:

- :class:`BDGFPretrain` -- stage 1 alone: the multimodal DDPM with adaptive modality masking,
  trained on random unlabelled tiles of the whole scene (``lightning fit --config
  configs/bdgf_pretrain_augsburg.yaml``). Its checkpoints carry the EMA denoiser in a form
  :class:`BDGF` reads (``ddpm_checkpoint``).
- :class:`BDGF` -- stages 1b + 2: obtains a DDPM (a given checkpoint, else a cached one for this
  scene and DDPM configuration, else it pre-trains one in-process), builds or reuses the
  whole-scene diffusion feature bank, adds it to the scene as the modality ``ddpm_features`` and
  trains the three-branch classifier with mutual learning.

Only the skeleton is the paper's [P]; the rest follows ``specs/bdgf.md`` (tags [R]/[D] there) and
every number is a constructor argument. The abstract announces code at github.com/HaoLiu-XDU/BDGF;
it was not available to this project and this reconstruction has not been compared with it. Where the DDPM weights live: the BDGF checkpoint stores
the EMA denoiser (``checkpoint["bdgf_ddpm"]``), so ``lightning test/predict --ckpt_path`` never
pre-trains again; the feature bank is rebuilt from those weights when the cache lacks it. Because
Lightning restores checkpoint weights *after* ``setup``, the bank is prepared in the
``on_{fit,validation,test,predict}_start`` hooks (before the first batch; the datasets cut their
windows lazily, so a modality added then reaches every batch).

Deviations from the spec (ours): the DDPM sees the modalities as the DataModule normalises them
(PCA components are whitened, the rest per-band z-score or min-max) instead of a rescale to
[-1, 1]; the cache keys hash the normalised scene data itself rather than file paths and mtimes;
no random flips/rot90 of the classifier's patches (the suite's DataModule has no augmentation).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import pickle
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchmetrics.classification import MulticlassAccuracy

from rsfusion.datamodules.feature_bank import (array_digest, cache_key, external_bank_channels, load_bank,
                                      read_external_bank, save_bank)
from rsfusion.datamodules.io import InputError, atomic_path
from rsfusion.datamodules.sampling import IGNORE_INDEX
from rsfusion.lightning_modules.base import Batch, FusionClassifier
from rsfusion.lightning_modules.networks.bdgf import (BRANCHES, DEFAULT_GUIDE_LEVELS, BDGFNet, BDGFOutput, bdgf_loss,
                                             warmup_weight)
from rsfusion.lightning_modules.networks.bdgf_diffusion import (MASKED_TARGETS, DiffusionSchedule, ModalityMaskingController,
                                                       MultimodalDenoiserUNet, ddpm_training_loss, draw_channel_mask,
                                                       extract_feature_cube, feature_cube_channels)

__all__ = ["BDGF", "BDGFPretrain", "BDGFDiffusion", "DDPM_DEFAULTS", "FEATURE_KEY", "pretrain_ddpm",
           "load_ddpm_payload", "default_cache_dir"]

FEATURE_KEY = "ddpm_features"  # the scene modality (and batch key) holding the diffusion feature patches
PAYLOAD_FORMAT = "rsfusion-bdgf-ddpm-v2"
# Payload formats load_ddpm_payload reads. v1 DDPMs were trained with the masked modality's
# epsilon as target (pure noise: spec 4.2 before its correction); they still load, with a warning.
READABLE_PAYLOAD_FORMATS = ("rsfusion-bdgf-ddpm-v1", PAYLOAD_FORMAT)
# Version of the stage-1 training objective, part of the DDPM cache key: bump it whenever a code
# change alters what pretraining learns, so a DDPM cached by older code is never reused.
# 2: masked modalities predict x0 or add no loss (masked_target), never their hidden epsilon.
STAGE1_OBJECTIVE_VERSION = 2

# The multimodal DDPM's configuration (spec section 4; all [D] except where noted). Keys of a
# ``ddpm`` dict override these; unknown keys are an error.
DDPM_DEFAULTS: dict[str, Any] = {
    # denoiser: guided-diffusion style UNet (spec 4.1)
    "base_channels": 64, "channel_mult": [1, 2, 2], "num_res_blocks": 2, "attention_levels": [2],
    "attention_heads": 4, "dropout": 0.1, "stem_channels": 32, "norm": "group", "norm_groups": 32,
    "time_embed_mult": 4, "mask_fill": "learned", "mask_indicator": "channel",
    # noise schedule: Ho et al. (spec 4.1)
    "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "schedule": "linear",
    # adaptive modality masking (spec 4.2 [R] mechanism, [D] numbers) and its ablation switches (4.3)
    "mask_mode": "adaptive", "initial_probabilities": None, "mask_ema_momentum": 0.99, "mask_window": 200,
    "mask_step_size": 0.05, "p_min": 0.05, "p_max": 0.5, "max_total": 0.9, "criterion": "loss_progress",
    "loss_weighting": "per_modality", "mask_granularity": "modality", "band_group_fraction": 0.5,
    # what a masked modality's outputs are trained on (spec 4.2 corrected [R]): x0 | none
    "masked_target": "x0",
}
_DENOISER_KEYS = ("base_channels", "channel_mult", "num_res_blocks", "attention_levels", "attention_heads",
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


def default_cache_dir() -> Path:
    """``$RSFUSION_CACHE_DIR/bdgf`` if set, else ``$XDG_CACHE_HOME`` (``~/.cache``) ``/rsfusion/bdgf``."""
    if os.environ.get("RSFUSION_CACHE_DIR"):
        return Path(os.environ["RSFUSION_CACHE_DIR"]).expanduser() / "bdgf"
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "rsfusion" / "bdgf"


# ----------------------------------------------------------------------------------------------
# Stage 1 core, shared by the Lightning module and the in-process loop
# ----------------------------------------------------------------------------------------------
class BDGFDiffusion(nn.Module):
    """The stage-1 state: denoiser, its EMA copy, noise schedule and modality-masking controller.

    ``modality_channels`` {name: bands} in stacking order (the first is the spectral image, whose
    masking probability starts higher: 0.3 vs 0.1 [D]); ``config`` as :func:`resolve_ddpm_config`.
    """

    def __init__(self, modality_channels: Mapping[str, int], config: Mapping[str, Any] | None = None):
        super().__init__()
        cfg = resolve_ddpm_config(config)
        self.config = cfg
        self.modality_channels = {n: int(c) for n, c in modality_channels.items()}
        self.denoiser = MultimodalDenoiserUNet(self.modality_channels, **{k: cfg[k] for k in _DENOISER_KEYS})
        self.ema = copy.deepcopy(self.denoiser).requires_grad_(False)
        self.schedule = DiffusionSchedule(cfg["num_timesteps"], cfg["beta_start"], cfg["beta_end"], cfg["schedule"])
        single = len(self.modality_channels) == 1
        self.masking = ModalityMaskingController(
            list(self.modality_channels), mode="none" if single else cfg["mask_mode"],
            initial_probabilities=cfg["initial_probabilities"], ema_momentum=cfg["mask_ema_momentum"],
            window=cfg["mask_window"], step_size=cfg["mask_step_size"], p_min=cfg["p_min"], p_max=cfg["p_max"],
            max_total=cfg["max_total"], criterion=cfg["criterion"])
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

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

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        """EMA of the weights with the usual warm-up min(decay, (1 + n) / (10 + n))."""
        n = int(self.ema_updates)
        d = min(decay, (1 + n) / (10 + n))
        for p_ema, p in zip(self.ema.parameters(), self.denoiser.parameters()):
            p_ema.lerp_(p.detach(), 1 - d)
        self.ema_updates += 1

    def payload(self) -> dict[str, Any]:
        """What a BDGF needs to rebuild the frozen EMA denoiser: config, modalities, weights."""
        return {"format": PAYLOAD_FORMAT, "objective": STAGE1_OBJECTIVE_VERSION, "config": dict(self.config),
                "modality_channels": dict(self.modality_channels),
                "state_dict": {k: v.detach().cpu().clone() for k, v in self.ema.state_dict().items()},
                "masking": self.masking.probabilities, "ema_updates": int(self.ema_updates)}


def denoiser_from_payload(payload: Mapping[str, Any]) -> tuple[MultimodalDenoiserUNet, DiffusionSchedule]:
    """The frozen EMA denoiser of a payload (in eval mode) and its noise schedule."""
    cfg = resolve_ddpm_config(payload["config"])
    # the random init is overwritten; fork the RNG so that building the bank or reading it from the
    # cache leaves the training run's random stream identical
    with torch.random.fork_rng(devices=[]):
        denoiser = MultimodalDenoiserUNet(payload["modality_channels"], **{k: cfg[k] for k in _DENOISER_KEYS})
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


def _pad_to_tile(x: Tensor, tile: int) -> Tensor:
    """Reflect-pad (C, H, W) at the bottom/right so both sides are at least ``tile``."""
    ph, pw = max(0, tile - x.shape[1]), max(0, tile - x.shape[2])
    if ph == pw == 0:
        return x
    mode = "reflect" if ph < x.shape[1] and pw < x.shape[2] else "replicate"
    return F.pad(x[None], (0, pw, 0, ph), mode=mode)[0]


def random_tiles(scene: Tensor, count: int, tile: int, generator: torch.Generator | None = None) -> Tensor:
    """``count`` random ``tile`` x ``tile`` crops of (C, H, W) ``scene`` with random flips and rot90."""
    _, h, w = scene.shape
    ys = torch.randint(0, h - tile + 1, (count,), generator=generator)
    xs = torch.randint(0, w - tile + 1, (count,), generator=generator)
    turns = torch.randint(0, 4, (count,), generator=generator)
    flips = torch.randint(0, 2, (count,), generator=generator)
    out = []
    for y, x, k, f in zip(ys.tolist(), xs.tolist(), turns.tolist(), flips.tolist()):
        t = torch.rot90(scene[:, y:y + tile, x:x + tile], k, dims=(1, 2))
        out.append(t.flip(-1) if f else t)
    return torch.stack(out)


class RandomSceneTiles(Dataset):
    """Random unlabelled tiles of a whole scene (the DDPM's training data): ``{"x0": (C, tile, tile)}``.

    ``scene`` (C, H, W) stacks the modalities; ``length`` tiles make one epoch.
    """

    def __init__(self, scene: Tensor, tile: int, length: int):
        if length < 1:
            raise ValueError(f"tiles_per_epoch must be >= 1, got {length}")
        self.scene, self.tile, self.length = _pad_to_tile(scene.float(), tile), tile, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"x0": random_tiles(self.scene, 1, self.tile)[0]}


def pretrain_ddpm(modalities: Mapping[str, np.ndarray | Tensor], config: Mapping[str, Any] | None = None,
                  steps: int = 30000, batch_size: int = 64, lr: float = 1e-4, tile: int = 32,
                  ema_decay: float = 0.999, grad_clip: float = 1.0, seed: int = 0,
                  log_every: int | None = None, device: torch.device | str | None = None) -> dict[str, Any]:
    """Stage 1 as a plain loop (no Lightning): returns the DDPM payload (EMA weights).

    ``modalities`` {name: (C_m, H, W)} normalised, unpadded, on a common grid. AdamW (weight decay
    0), gradient clipping, EMA of the weights, random flipped/rotated tiles [D, spec 4.2 recipe].
    Deterministic for a given ``seed`` (the global RNG is restored afterwards). Runs on ``device``
    (default CPU); tiles, timesteps, noise and masks are drawn on the CPU either way.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"pretrain_steps and pretrain_batch_size must be >= 1, got {steps}, {batch_size}")
    channels = {n: int(np.shape(a)[0]) for n, a in modalities.items()}
    scene = torch.cat([torch.as_tensor(np.asarray(a), dtype=torch.float32) for a in modalities.values()], dim=0)
    log_every = log_every or max(1, steps // 10)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BDGFDiffusion(channels, config).to(device or "cpu")
        if tile % model.denoiser.downsample_factor:
            raise ValueError(f"pretrain_tile ({tile}) must be a multiple of the denoiser's downsample factor "
                             f"{model.denoiser.downsample_factor}")
        scene = _pad_to_tile(scene, tile)
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(model.denoiser.parameters(), lr=lr, weight_decay=0.0)
        model.train()
        start = time.perf_counter()
        for step in range(1, steps + 1):
            x0 = random_tiles(scene, batch_size, tile, generator).to(device or "cpu")
            out = model.training_loss(x0, generator)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            model.after_backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.denoiser.parameters(), grad_clip)
            optimizer.step()
            model.update_ema(ema_decay)
            if step % log_every == 0 or step == steps:
                probs = ", ".join(f"{n} {p:.3f}" for n, p in model.masking.probabilities.items())
                rank_zero_info(f"BDGF pretrain step {step}/{steps}: loss {float(out['loss'].detach()):.4f}, "
                               f"p_mask [{probs}] ({time.perf_counter() - start:.1f} s)")
    return model.payload()


# ----------------------------------------------------------------------------------------------
# Stage 1 as a LightningModule
# ----------------------------------------------------------------------------------------------
def _scene_of(module: nn.Module):
    dm = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
    scene = getattr(dm, "scene", None)
    if scene is None:
        raise InputError(f"{type(module).__name__} needs a RasterDataModule (its scene) as datamodule")
    return dm, scene


def _unpadded(scene, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The normalised (C, H, W) arrays of ``names`` without the reflect padding."""
    bad = [n for n in names if scene.ratios.get(n, 1) != 1]
    if bad:
        raise InputError(f"BDGF's DDPM needs every modality on one grid; {bad} are finer than the reference grid "
                         "(resample them first)")
    p = scene.pad
    return {n: scene.data[n][:, p:scene.data[n].shape[1] - p, p:scene.data[n].shape[2] - p] for n in names}


class BDGFPretrain(FusionClassifier):
    """BDGF stage 1: the multimodal DDPM with adaptive modality masking, on unlabelled scene tiles.

    Labels are not used: in ``setup("fit")`` the DataModule's training set is replaced by
    :class:`RandomSceneTiles` (random ``tile`` crops with flips/rot90 of the whole normalised
    scene, ``tiles_per_epoch`` per epoch, batch size = the DataModule's). Validation reports the
    EMA denoiser's unmasked loss ``val/ddpm_loss`` on the validation patches (fixed noise). Logged
    every optimiser step: the masking probabilities ``train/p_mask/<modality>``, the controller's
    EMA losses and imbalance ratios (``train/ema_loss/<m>``, ``train/rho/<m>``), each modality's
    loss term ``train/loss_<m>``, its epsilon loss where visible ``train/eps_loss_visible/<m>`` (what
    the controller reads) and its variance-normalised x0 loss where masked
    ``train/x0_loss_masked/<m>`` (below 1 = better than predicting the mean). Checkpoints hold the EMA denoiser in ``checkpoint["bdgf_ddpm"]``
    for :class:`BDGF`'s ``ddpm_checkpoint``.

    Args:
        ddpm: overrides of :data:`DDPM_DEFAULTS` (architecture, schedule, masking).
        tile: training tile side (32 [D]); a multiple of the UNet's downsample factor.
        tiles_per_epoch: tiles per epoch (one epoch = tiles_per_epoch / batch_size steps).
        ema_decay: EMA of the weights (0.999 [D]).
        lr, weight_decay, scheduler: AdamW 1e-4, no decay, constant lr [D, spec 4.2]; gradient
            clipping (1.0 [D]) is the Trainer's ``gradient_clip_val``.
        **kwargs: :class:`FusionClassifier` options (linked in_channels, num_classes, ...).
    """

    samplings = frozenset({"pixel", "tile"})

    def __init__(self, ddpm: dict[str, Any] | None = None, tile: int = 32, tiles_per_epoch: int = 6400,
                 ema_decay: float = 0.999, dense: bool = False, lr: float = 1e-4, weight_decay: float = 0.0,
                 scheduler: Literal["cosine", "step_decay", "none"] = "none", **kwargs):
        super().__init__(dense=dense, lr=lr, weight_decay=weight_decay, scheduler=scheduler, **kwargs)
        if self.hparams.label_smoothing or self.hparams.class_weights is not None:
            raise InputError("BDGFPretrain trains a DDPM without labels: label_smoothing and class_weights do not "
                             "apply (set them on BDGF, stage 3)")
        self.diffusion = BDGFDiffusion(self.in_channels, ddpm)
        factor = self.diffusion.denoiser.downsample_factor
        if tile < factor or tile % factor:
            raise ValueError(f"tile ({tile}) must be a multiple of the denoiser's downsample factor {factor}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.tile, self.tiles_per_epoch, self.ema_decay = tile, tiles_per_epoch, ema_decay

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        return [{"params": list(self.diffusion.denoiser.parameters()), "weight_decay": weight_decay}]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self._trainer is None or getattr(self.trainer, "datamodule", None) is None:
            return
        dm, scene = _scene_of(self)
        if stage == "fit":
            arrays = _unpadded(scene, list(self.in_channels))
            stacked = torch.from_numpy(np.concatenate([arrays[n] for n in self.in_channels], axis=0).copy())
            dm.train_dataset = RandomSceneTiles(stacked, self.tile, self.tiles_per_epoch)
            rank_zero_info(f"BDGFPretrain: training the DDPM on random {self.tile}x{self.tile} tiles of the whole "
                           f"{scene.shape[0]}x{scene.shape[1]} scene ({self.tiles_per_epoch} tiles per epoch)")

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
        self.diffusion.update_ema(self.ema_decay)

    def _eval_loss(self, batch: Batch, batch_idx: int) -> tuple[Tensor, int]:
        x0 = self.diffusion.stack({n: batch[n] for n in self.in_channels})
        factor = self.diffusion.denoiser.downsample_factor
        h, w = (x0.shape[-2] // factor) * factor, (x0.shape[-1] // factor) * factor
        if h == 0 or w == 0:
            raise InputError(f"BDGFPretrain: evaluation patches of {tuple(x0.shape[-2:])} are smaller than the "
                             f"denoiser's downsample factor {factor}; use data.patch_size >= {factor}")
        x0 = x0[..., :h, :w]
        generator = torch.Generator().manual_seed(batch_idx)
        out = ddpm_training_loss(self.diffusion.ema, self.diffusion.schedule, x0, None,
                                 self.diffusion.config["loss_weighting"], generator)
        return out["loss"], x0.shape[0]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        loss, size = self._eval_loss(batch, batch_idx)
        self.log("val/ddpm_loss", loss, prog_bar=True, batch_size=size)

    def on_validation_epoch_end(self) -> None:
        """No classification metrics: the DDPM is judged by its denoising loss."""

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        loss, size = self._eval_loss(batch, batch_idx)
        self.log("test/ddpm_loss", loss, batch_size=size)

    def on_test_epoch_end(self) -> None:
        """No classification metrics: the DDPM is judged by its denoising loss."""

    def predict_step(self, batch: Batch, batch_idx: int) -> Batch:
        raise InputError("BDGFPretrain has no classification output: train BDGF with "
                         "ddpm_checkpoint=<this checkpoint> to map the scene")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["bdgf_ddpm"] = self.diffusion.payload()


# ----------------------------------------------------------------------------------------------
# Stages 1b + 2
# ----------------------------------------------------------------------------------------------
class BDGF(FusionClassifier):
    """BDGF: diffusion-guided CNN / Mamba / Transformer branches with mutual learning (``pixel`` sampling).

    Where the guide features come from (first that applies):
      1. ``feature_bank``: any (F, H, W) ``.npy`` cube on the scene grid, used as given (the
         paper's cross-model experiment [S]); ``feature_bank_split`` lists the channel counts of
         its consecutive blocks (``guide_levels`` then indexes the blocks), else every guided
         branch sees the whole cube.
      2. the DDPM of ``ddpm_checkpoint`` (a :class:`BDGFPretrain` checkpoint, a BDGF checkpoint or a
         cached DDPM file); its own configuration replaces ``ddpm``.
      3. a DDPM cached under ``cache_dir`` for this scene (normalised data), ``ddpm`` configuration and
         pre-training recipe; else one pre-trained in-process for ``pretrain_steps`` steps and
         saved there atomically.
    The bank (decoder ``feature_levels`` at ``feature_timesteps``, averaged, tiles of
    ``feature_tile`` with ``feature_overlap``, fixed noise ``feature_seed`` [D, spec 5]) is cached as
    fp16 ``.npy`` under ``cache_dir/banks`` with a key hashing the DDPM weights, the normalised scene
    data and these settings; damaged files are detected (shape/values) and rebuilt.

    Args:
        ddpm_checkpoint, feature_bank, feature_bank_split: see above.
        ddpm: overrides of :data:`DDPM_DEFAULTS` for an in-process DDPM.
        pretrain_steps, pretrain_batch_size, pretrain_lr, pretrain_tile, pretrain_ema_decay,
            pretrain_grad_clip, pretrain_seed: the in-process stage-1 recipe (spec 4.2: 30k steps,
            batch 64, AdamW 1e-4, tiles 32, EMA 0.999, clip 1.0 [D]).
        feature_timesteps, feature_levels, feature_tile, feature_overlap, feature_batch_size,
            feature_seed, timestep_reduction: stage 1b ({50, 150} averaged, levels 0/1/2, 32/16 [D]).
        guide_levels: {branch: level} (default cnn 0 = shallow, mamba 1, transformer 2 = deep [R]);
            a branch left out is unguided; ``{}`` trains without diffusion features (ablation A).
        cache_dir: where DDPMs and banks are cached (default :func:`default_cache_dir`).
        branches, dim, proj_dim, cnn_kwargs, mamba_kwargs, transformer_kwargs: :class:`BDGFNet`.
        ml, temperature, lambda_prob, lambda_feat, entropy_weight, warmup_fraction: mutual learning
            (spec 7: both, tau 2, 1.0, 0.5, 0.1, 10 % of the steps [D]); see :func:`bdgf_loss`.
        **kwargs: :class:`FusionClassifier` options (AdamW lr 1e-3, wd 1e-4, cosine [D, spec 8]).
    """

    def __init__(
        self,
        ddpm_checkpoint: str | None = None,
        feature_bank: str | None = None,
        feature_bank_split: list[int] | None = None,
        ddpm: dict[str, Any] | None = None,
        pretrain_steps: int = 30000,
        pretrain_batch_size: int = 64,
        pretrain_lr: float = 1e-4,
        pretrain_tile: int = 32,
        pretrain_ema_decay: float = 0.999,
        pretrain_grad_clip: float = 1.0,
        pretrain_seed: int = 0,
        feature_timesteps: list[int] = (50, 150),
        feature_levels: list[int] = (0, 1, 2),
        feature_tile: int = 32,
        feature_overlap: int = 16,
        feature_batch_size: int = 16,
        feature_seed: int = 0,
        timestep_reduction: Literal["mean", "concat"] = "mean",
        guide_levels: dict[str, int] | None = None,
        cache_dir: str | None = None,
        branches: list[str] = list(BRANCHES),
        dim: int = 64,
        proj_dim: int = 64,
        cnn_kwargs: dict[str, Any] | None = None,
        mamba_kwargs: dict[str, Any] | None = None,
        transformer_kwargs: dict[str, Any] | None = None,
        ml: Literal["none", "prob", "feat", "both"] = "both",
        temperature: float = 2.0,
        lambda_prob: float = 1.0,
        lambda_feat: float = 0.5,
        entropy_weight: float = 0.1,
        warmup_fraction: float = 0.1,
        patch_size: int = 11,
        **kwargs,
    ):
        super().__init__(patch_size=patch_size, **kwargs)
        if self.hparams.get("class_weights") is not None:
            raise ValueError("class_weights: not supported by BDGF's loss (bdgf_loss has no class weights)")
        if ddpm_checkpoint is not None and feature_bank is not None:
            raise ValueError("give ddpm_checkpoint or feature_bank, not both")
        self.branch_list = list(branches)
        unknown = [b for b in self.branch_list if b not in BRANCHES]
        if unknown:
            raise ValueError(f"branches: {unknown} not among {list(BRANCHES)}")
        self.guide_levels = dict(DEFAULT_GUIDE_LEVELS if guide_levels is None else guide_levels)
        bad = [b for b in self.guide_levels if b not in BRANCHES]
        if bad:
            raise ValueError(f"guide_levels: unknown branches {bad} (known: {list(BRANCHES)})")
        self.guide_levels = {b: int(lvl) for b, lvl in self.guide_levels.items() if b in self.branch_list}
        self.feature_timesteps = [int(t) for t in feature_timesteps]
        self.feature_levels = [int(lvl) for lvl in feature_levels]
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self._ddpm_payload: dict | None = None
        self._bank_key: str | None = None  # key of the bank added to the scene with id _bank_scene
        self._sources: dict[str, str] = {}  # where the last DDPM / bank came from ("cache" or "built")
        self._bank_scene: int | None = None
        self._branch_logits: dict[str, Tensor] = {}

        blocks = self._bank_blocks(ddpm_checkpoint, feature_bank, feature_bank_split, ddpm)
        self.bank_channels = sum(blocks) if blocks else 0
        offsets = np.concatenate([[0], np.cumsum(blocks)]).astype(int).tolist() if blocks else [0]
        self.guide_slices: dict[str, tuple[int, int]] = {}
        for b, lvl in self.guide_levels.items():
            if feature_bank is not None and not feature_bank_split:
                self.guide_slices[b] = (0, self.bank_channels)
                continue
            if not 0 <= lvl < len(blocks):
                names = ("feature_bank_split blocks" if feature_bank is not None
                         else f"feature_levels {self.feature_levels}")
                raise ValueError(f"guide_levels[{b!r}] = {lvl} is not among the {names}")
            self.guide_slices[b] = (offsets[lvl], offsets[lvl + 1])
        guide_channels = {b: e - s for b, (s, e) in self.guide_slices.items()}
        self.net = BDGFNet(self.in_channels, self.num_classes, guide_channels, patch_size, self.branch_list, dim,
                           proj_dim, cnn_kwargs, mamba_kwargs, transformer_kwargs)
        metric = lambda: MulticlassAccuracy(self.num_classes, average="micro", ignore_index=IGNORE_INDEX)  # noqa: E731
        self.val_branch_oa = nn.ModuleDict({b: metric() for b in self.branch_list})
        self.test_branch_oa = nn.ModuleDict({b: metric() for b in self.branch_list})

    # ------------------------------------------------------------------ feature bank layout
    def _bank_blocks(self, ddpm_checkpoint, feature_bank, feature_bank_split, ddpm) -> list[int]:
        """Channel counts of the bank's consecutive blocks; ``guide_levels`` index into them.

        For a DDPM bank the blocks are ``feature_levels`` in order, so ``guide_levels`` values are
        decoder levels; they are mapped to block positions here.
        """
        if not self.guide_levels:
            return []
        if feature_bank is not None:
            total = external_bank_channels(feature_bank)
            if feature_bank_split:
                if sum(feature_bank_split) != total or min(feature_bank_split) < 1:
                    raise ValueError(f"feature_bank_split {list(feature_bank_split)} must be positive and sum to "
                                     f"the bank's {total} channels")
                return [int(c) for c in feature_bank_split]
            return [total]
        if ddpm_checkpoint is not None:
            self._ddpm_payload = load_ddpm_payload(ddpm_checkpoint)
            self._check_payload_modalities(self._ddpm_payload, ddpm_checkpoint)
            config = self._ddpm_payload["config"]
        else:
            config = resolve_ddpm_config(ddpm)
        with torch.device("meta"):
            config = resolve_ddpm_config(config)
            unet = MultimodalDenoiserUNet(self.in_channels, **{k: config[k] for k in _DENOISER_KEYS})
        widths = feature_cube_channels(unet, self.feature_levels, len(self.feature_timesteps),
                                       self.hparams.timestep_reduction)
        missing = {b: lvl for b, lvl in self.guide_levels.items() if lvl not in widths}
        if missing:
            raise ValueError(f"guide_levels {missing} must be among feature_levels {self.feature_levels}")
        unused = sorted(set(self.feature_levels) - set(self.guide_levels.values()))
        if unused:
            raise ValueError(f"feature_levels {unused} would be extracted and cached but no branch reads them "
                             f"(guide_levels {self.guide_levels}): drop them from feature_levels")
        self.guide_levels = {b: self.feature_levels.index(lvl) for b, lvl in self.guide_levels.items()}
        return list(widths.values())

    def _check_payload_modalities(self, payload: Mapping, source) -> None:
        if dict(payload["modality_channels"]) != dict(self.in_channels):
            raise InputError(f"{source}: the DDPM was trained on {dict(payload['modality_channels'])}, the data has "
                             f"{dict(self.in_channels)}")

    # ------------------------------------------------------------------ network
    def _modalities(self, batch: Batch) -> dict[str, Tensor]:
        return {n: batch[n] for n in self.in_channels}

    def _guides(self, batch: Batch) -> dict[str, Tensor]:
        if not self.guide_slices:
            return {}
        if FEATURE_KEY not in batch:
            raise InputError(f"BDGF: the batch has no {FEATURE_KEY!r} patches; the feature bank is added to the "
                             "DataModule's scene when fit/validate/test/predict starts")
        feats = batch[FEATURE_KEY].float()
        if feats.shape[1] != self.bank_channels:
            raise InputError(f"BDGF: feature patches have {feats.shape[1]} channels, the model expects "
                             f"{self.bank_channels}")
        return {b: feats[:, s:e] for b, (s, e) in self.guide_slices.items()}

    def branch_outputs(self, batch: Batch) -> BDGFOutput:
        return self.net(self._modalities(batch), self._guides(batch))

    @staticmethod
    def ensemble_log_probs(logits: Mapping[str, Tensor]) -> Tensor:
        """Log of the mean of the branch softmaxes (B, K) [D]: the prediction's scores."""
        return BDGFNet.ensemble_probabilities(logits).clamp_min(1e-12).log()

    def forward(self, batch: Batch) -> Tensor:
        return self.ensemble_log_probs(self.branch_outputs(batch).logits)

    def predict_logits(self, batch: Batch) -> Tensor:
        """Log of the mean branch probabilities; keeps the branch logits for per-branch metrics."""
        out = self.branch_outputs(batch)
        self._branch_logits = {b: logits.detach() for b, logits in out.logits.items()}
        return self.ensemble_log_probs(out.logits)

    def _progress(self) -> float:
        if self._trainer is None:
            return 1.0
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            return 1.0
        return self.global_step / total

    def training_loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        hp = self.hparams
        weight = warmup_weight(self._progress(), hp.warmup_fraction)
        terms = bdgf_loss(self.branch_outputs(batch), batch["label"], ml=hp.ml, temperature=hp.temperature,
                          lambda_prob=hp.lambda_prob, lambda_feat=hp.lambda_feat, entropy_weight=hp.entropy_weight,
                          warmup=weight, label_smoothing=hp.label_smoothing)
        loss = terms.pop("loss")
        terms["ml_weight"] = torch.tensor(weight)
        return loss, terms

    def _update_branch_metrics(self, metrics: nn.ModuleDict, target: Tensor) -> None:
        for b, logits in self._branch_logits.items():
            metrics[b].update(logits.argmax(1), target)

    def _log_branch_metrics(self, metrics: nn.ModuleDict, split: str) -> None:
        for b, metric in metrics.items():
            self.log(f"{split}/OA_{b}", metric.compute())
            metric.reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self._update_branch_metrics(self.val_branch_oa, batch["label"])

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._log_branch_metrics(self.val_branch_oa, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        self._update_branch_metrics(self.test_branch_oa, batch["label"])

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._log_branch_metrics(self.test_branch_oa, "test")

    # ------------------------------------------------------------------ the DDPM and the bank
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._ddpm_payload is not None:
            checkpoint["bdgf_ddpm"] = self._ddpm_payload

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        payload = checkpoint.get("bdgf_ddpm")
        if payload is not None:
            if self._ddpm_payload is None or payload_digest(payload) != payload_digest(self._ddpm_payload):
                self._bank_key = None  # another DDPM: the scene's bank must be redone
            self._ddpm_payload = payload

    def on_fit_start(self) -> None:
        self.prepare_feature_bank()
        super().on_fit_start()

    def on_validation_start(self) -> None:
        self.prepare_feature_bank()

    def on_test_start(self) -> None:
        self.prepare_feature_bank()

    def on_predict_start(self) -> None:
        dm = self.trainer.datamodule
        if dm is not None and dm.hparams.get("predict_window"):
            raise InputError("BDGF: predict_window is not supported (its diffusion feature bank is built over the "
                             "whole scene in memory); unset data.predict_window for BDGF")
        self.prepare_feature_bank()

    def prepare_feature_bank(self, scene=None) -> None:
        """Add the guide features to ``scene`` (default: the DataModule's) as modality ``ddpm_features``.

        Idempotent: a scene that already holds this model's bank is left alone.
        """
        if not self.guide_slices:
            return
        if scene is None:
            _, scene = _scene_of(self)
        if self._bank_key is not None and self._bank_scene == id(scene) and FEATURE_KEY in scene.data:
            return
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            self._build_or_load_bank(scene)
            return
        # DDP: rank 0 pretrains the DDPM and extracts the bank into the cache; the other ranks wait,
        # then read both from it, so every rank uses the same features (and the work is done once).
        if trainer.is_global_zero:
            self._build_or_load_bank(scene)
            trainer.strategy.barrier("bdgf_feature_bank")
            return
        trainer.strategy.barrier("bdgf_feature_bank")
        self._sources = {}
        self._build_or_load_bank(scene)
        built = [what for what, source in self._sources.items() if source == "built"]
        if built:
            logging.getLogger("lightning.pytorch").warning(f"BDGF rank {trainer.global_rank}: rebuilt the {' and '.join(built)} that rank 0 had cached "
                      f"(is {self.cache_dir} shared between nodes?)")
        else:
            logging.getLogger("lightning.pytorch").info(
                f"BDGF rank {trainer.global_rank}: DDPM and feature bank read from rank 0's cache")

    def _build_or_load_bank(self, scene) -> None:
        hp = self.hparams
        if hp.feature_bank is not None:
            cube = read_external_bank(hp.feature_bank, *scene.shape)
            rank_zero_info(f"BDGF: using the feature bank {hp.feature_bank} as given ({cube.shape[0]} channels)")
            scene.add(FEATURE_KEY, cube)
            self._bank_key, self._bank_scene = f"file:{hp.feature_bank}", id(scene)
            return
        data = _unpadded(scene, list(self.in_channels))
        data_hash = array_digest(data)
        payload = self._obtain_ddpm(data, data_hash)
        key = cache_key(kind="bank", ddpm=payload_digest(payload), data=data_hash, timesteps=self.feature_timesteps,
                        levels=self.feature_levels, tile=hp.feature_tile, overlap=hp.feature_overlap,
                        seed=hp.feature_seed, reduction=hp.timestep_reduction, blend="mean")
        path = self.cache_dir / "banks" / f"{key}.npy"
        shape = (self.bank_channels, *scene.shape)
        cube, reason = load_bank(path, shape)
        self._sources["bank"] = "cache" if cube is not None else "built"
        if cube is not None:
            rank_zero_info(f"BDGF: feature bank cache hit, reusing {path}")
        else:
            if reason != "missing":
                rank_zero_warn(f"BDGF: cached feature bank {path} is unusable ({reason}); rebuilding it")
            cube = self._extract_bank(payload, data)
            save_bank(path, cube, {"ddpm": payload_digest(payload), "data": data_hash, "shape": list(cube.shape),
                                   "levels": self.feature_levels, "timesteps": self.feature_timesteps,
                                   "modalities": list(data)})
            rank_zero_info(f"BDGF: feature bank {tuple(cube.shape)} saved to {path}")
        scene.add(FEATURE_KEY, cube)
        self._bank_key, self._bank_scene = key, id(scene)

    def _extract_bank(self, payload: Mapping, data: Mapping[str, np.ndarray]) -> np.ndarray:
        hp = self.hparams
        denoiser, schedule = denoiser_from_payload(payload)
        denoiser, schedule = denoiser.to(self.device), schedule.to(self.device)
        rank_zero_info(f"BDGF: extracting diffusion features (levels {self.feature_levels}, timesteps "
                       f"{self.feature_timesteps}) over the {data[next(iter(data))].shape[1:]} scene")
        start = time.perf_counter()
        marks = set()

        def progress(done: int, total: int) -> None:
            quarter = 4 * done // total
            if quarter not in marks and quarter > 0:
                marks.add(quarter)
                rank_zero_info(f"BDGF: feature tiles {done}/{total} ({time.perf_counter() - start:.1f} s)")

        tensors = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in data.items()}
        cube = extract_feature_cube(denoiser, schedule, tensors,
                                    timesteps=self.feature_timesteps, levels=self.feature_levels, tile=hp.feature_tile,
                                    overlap=hp.feature_overlap, batch_size=hp.feature_batch_size, seed=hp.feature_seed,
                                    timestep_reduction=hp.timestep_reduction, progress=progress)
        return cube.numpy().astype(np.float16)

    def _obtain_ddpm(self, data: Mapping[str, np.ndarray], data_hash: str) -> dict:
        if self._ddpm_payload is not None:
            self._check_payload_modalities(self._ddpm_payload, "the DDPM in the checkpoint")
            return self._ddpm_payload
        hp = self.hparams
        config = resolve_ddpm_config(hp.ddpm)
        recipe = {"steps": hp.pretrain_steps, "batch_size": hp.pretrain_batch_size, "lr": hp.pretrain_lr,
                  "tile": hp.pretrain_tile, "ema_decay": hp.pretrain_ema_decay, "grad_clip": hp.pretrain_grad_clip,
                  "seed": hp.pretrain_seed}
        key = cache_key(kind="ddpm", data=data_hash, config=config, recipe=recipe, format=PAYLOAD_FORMAT,
                        objective=STAGE1_OBJECTIVE_VERSION)
        path = self.cache_dir / "ddpm" / f"{key}.pt"
        if path.is_file():
            try:
                payload = load_ddpm_payload(path)
                self._check_payload_modalities(payload, path)
                rank_zero_info(f"BDGF: DDPM cache hit, reusing {path} (no pretraining)")
                self._sources["DDPM"] = "cache"
                self._ddpm_payload = payload
                return payload
            except InputError as err:
                rank_zero_warn(f"BDGF: cached DDPM is unusable ({err}); pretraining again")
        rank_zero_info(f"BDGF: no cached DDPM for this scene and configuration; pretraining for "
                       f"{hp.pretrain_steps} steps (batch {hp.pretrain_batch_size}, tiles {hp.pretrain_tile})")
        payload = pretrain_ddpm(data, config, steps=hp.pretrain_steps, batch_size=hp.pretrain_batch_size,
                                lr=hp.pretrain_lr, tile=hp.pretrain_tile, ema_decay=hp.pretrain_ema_decay,
                                grad_clip=hp.pretrain_grad_clip, seed=hp.pretrain_seed, device=self.device)
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        rank_zero_info(f"BDGF: DDPM saved to {path}")
        self._sources["DDPM"] = "built"
        self._ddpm_payload = payload
        return payload
