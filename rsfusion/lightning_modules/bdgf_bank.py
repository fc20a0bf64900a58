"""BDGF stages 1 and 2 for a scene: find or train the DDPM, then find or build its diffusion feature bank.

:class:`FeatureBankProvider` is all :class:`~rsfusion.lightning_modules.bdgf.BDGF` asks for: given the
scene's normalised, unpadded modalities it returns the (F, H, W) fp16 bank. Both products are cached
under ``cache_dir`` (default :func:`default_cache_dir`) with keys that hash what made them: the DDPM
by the scene data, its configuration, pre-training recipe and objective version; the bank by the
DDPM's weights, the scene data and the extraction settings. Damaged files are detected and rebuilt.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from rsfusion.datamodules.errors import InputError
from rsfusion.datamodules.feature_bank import (
    array_digest,
    cache_key,
    external_bank_channels,
    load_bank,
    open_bank,
    save_bank,
)
from rsfusion.datamodules.writing import atomic_path
from rsfusion.lightning_modules.bdgf_features import build_feature_bank, feature_cube_channels
from rsfusion.lightning_modules.bdgf_pretrain import (
    DENOISER_KEYS,
    PAYLOAD_FORMAT,
    STAGE1_OBJECTIVE_VERSION,
    load_ddpm_payload,
    payload_digest,
    pretrain_ddpm,
    resolve_ddpm_config,
)
from rsfusion.lightning_modules.networks.bdgf_diffusion import MultimodalDenoiserUNet

__all__ = ["BankSettings", "FeatureBankProvider", "PretrainRecipe", "default_cache_dir", "guide_layout"]


def default_cache_dir() -> Path:
    """``$RSFUSION_CACHE_DIR/bdgf`` if set, else ``$XDG_CACHE_HOME`` (``~/.cache``) ``/rsfusion/bdgf``."""
    if os.environ.get("RSFUSION_CACHE_DIR"):
        return Path(os.environ["RSFUSION_CACHE_DIR"]).expanduser() / "bdgf"
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "rsfusion" / "bdgf"


@dataclass(frozen=True)
class PretrainRecipe:
    """Stage 1 in process: optimiser steps, batch, AdamW lr, tile side, EMA decay, gradient clip, seed."""

    steps: int
    batch_size: int
    lr: float
    tile: int
    ema_decay: float
    grad_clip: float
    seed: int


@dataclass(frozen=True)
class BankSettings:
    """Stage 2: decoder ``levels`` at ``timesteps`` (reduced by ``reduction``), tiles of ``tile`` with
    ``overlap``, ``batch_size`` tiles per pass, fixed noise ``seed``."""

    timesteps: tuple[int, ...]
    levels: tuple[int, ...]
    tile: int
    overlap: int
    batch_size: int
    seed: int
    reduction: str


class FeatureBankProvider:
    """The DDPM (``payload``: given, cached, or pre-trained here) and the feature bank it makes of a scene."""

    def __init__(self, in_channels: Mapping[str, int], ddpm: Mapping[str, Any] | None, recipe: PretrainRecipe,
                 settings: BankSettings, cache_dir: str | Path | None = None, payload: dict | None = None):
        self.in_channels = dict(in_channels)
        self.ddpm, self.recipe, self.settings = ddpm, recipe, settings
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.payload = payload
        self.sources: dict[str, str] = {}  # where the last DDPM / bank came from ("cache" or "built")
        self.bank_path: Path | None = None  # the cached bank file last used

    def check_payload(self, payload: Mapping, source) -> None:
        if dict(payload["modality_channels"]) != self.in_channels:
            raise InputError(f"{source}: the DDPM was trained on {dict(payload['modality_channels'])}, the data has "
                             f"{self.in_channels}")

    def bank_key(self, data_hash: str, payload: Mapping) -> str:
        s = self.settings
        return cache_key(kind="bank", ddpm=payload_digest(payload), data=data_hash, timesteps=list(s.timesteps),
                         levels=list(s.levels), tile=s.tile, overlap=s.overlap, seed=s.seed, reduction=s.reduction,
                         blend="mean")

    def bank(self, data: Mapping[str, np.ndarray], channels: int, trainer=None,
             device: torch.device | str = "cpu") -> np.ndarray:
        """The fp16 (``channels``, H, W) bank of ``data`` ({modality: normalised, unpadded (C, H, W)}), from the
        cache or built on ``device`` (rank 0 writes the cache). ``trainer``: the running Trainer (DDP, log folder)."""
        s = self.settings
        data_hash = array_digest(data)
        payload = self.obtain_ddpm(data, data_hash, trainer)
        path = self.cache_dir / "banks" / f"{self.bank_key(data_hash, payload)}.npy"
        cube, reason = load_bank(path, (channels, *next(iter(data.values())).shape[1:]))
        self.sources["bank"] = "cache" if cube is not None else "built"
        if cube is not None:
            rank_zero_info(f"BDGF: feature bank cache hit, reusing {path}")
        else:
            if reason != "missing":
                rank_zero_warn(f"BDGF: cached feature bank {path} is unusable ({reason}); rebuilding it")
            cube = build_feature_bank(payload, data, timesteps=s.timesteps, levels=s.levels, tile=s.tile,
                                      overlap=s.overlap, batch_size=s.batch_size, seed=s.seed,
                                      timestep_reduction=s.reduction, device=device)
            if trainer is None or trainer.is_global_zero:
                save_bank(path, cube, {"ddpm": payload_digest(payload), "data": data_hash, "shape": list(cube.shape),
                                       "levels": list(s.levels), "timesteps": list(s.timesteps), "tile": s.tile,
                                       "overlap": s.overlap, "seed": s.seed, "reduction": s.reduction,
                                       "modalities": list(data)})
                rank_zero_info(f"BDGF: feature bank {tuple(cube.shape)} saved to {path}")
        self.bank_path = path
        if trainer is not None and trainer.world_size > 1:
            sources = ", ".join(f"{what} {how}" for what, how in self.sources.items())
            logging.getLogger("lightning.pytorch").info(
                f"BDGF rank {trainer.global_rank}: " + sources.replace(" cache", " read from the cache"))
        return cube

    def cached_bank_file(self, path: str | Path | None, shape: tuple[int, int], channels: int) -> str:
        """``path``, a cached bank this provider's DDPM made for a scene of ``shape``, checked (its provenance
        ``.json`` names the DDPM) for reading window by window; else a one-line error."""
        path = Path(path) if path else None
        if path is None or not path.is_file() or self.payload is None:
            raise InputError(f"BDGF: predict_window reads the feature bank window by window, but "
                             f"{path or 'the checkpoint'} names no cached bank: predict once without "
                             "data.predict_window (builds it) or give model.feature_bank")
        meta = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").is_file() else {}
        if meta.get("ddpm") != payload_digest(self.payload):
            raise InputError(f"{path}: this feature bank was not made by the checkpoint's DDPM")
        bank = open_bank(path, *shape)
        if bank.shape[0] != channels:
            raise InputError(f"{path}: {bank.shape[0]} channels, the model expects {channels}")
        rank_zero_info(f"BDGF: reading the feature bank {path} window by window (memory-mapped)")
        return str(path)

    def obtain_ddpm(self, data: Mapping[str, np.ndarray], data_hash: str, trainer=None) -> dict:
        """The given DDPM, else the one cached for this scene and configuration, else one pre-trained now."""
        self.sources = {}
        if self.payload is not None:
            self.check_payload(self.payload, "the DDPM in the checkpoint")
            return self.payload
        r = self.recipe
        config = resolve_ddpm_config(self.ddpm)
        recipe = {"steps": r.steps, "batch_size": r.batch_size, "lr": r.lr, "tile": r.tile, "ema_decay": r.ema_decay,
                  "grad_clip": r.grad_clip, "seed": r.seed}
        key = cache_key(kind="ddpm", data=data_hash, config=config, recipe=recipe, format=PAYLOAD_FORMAT,
                        objective=STAGE1_OBJECTIVE_VERSION)
        path = self.cache_dir / "ddpm" / f"{key}.pt"
        payload = self._cached_ddpm(path)
        if trainer is not None and trainer.world_size > 1:
            # all ranks take the same road: a rank without the cached file (another node) trains with the rest
            if not trainer.strategy.reduce_boolean_decision(payload is not None, all=True):
                payload = None
        if payload is not None:
            rank_zero_info(f"BDGF: DDPM cache hit, reusing {path} (no pretraining)")
            self.sources["DDPM"], self.payload = "cache", payload
            return payload
        processes = trainer.world_size if trainer is not None else 1
        rank_zero_info(f"BDGF: no cached DDPM for this scene and configuration; stage 1 is a Trainer run of "
                       f"{r.steps} steps on {processes} process(es) (batch {r.batch_size} per process, tiles {r.tile})")
        # logged beside the run's own log; a run without a logger logs nothing of stage 1 either
        log_dir = Path(trainer.log_dir) / "bdgf_pretrain" if trainer is not None and trainer.loggers else None
        payload = pretrain_ddpm(data, config, steps=r.steps, batch_size=r.batch_size, lr=r.lr, tile=r.tile,
                                ema_decay=r.ema_decay, grad_clip=r.grad_clip, seed=r.seed, like=trainer,
                                log_dir=log_dir)
        if trainer is None or trainer.is_global_zero:
            with atomic_path(path) as tmp:
                torch.save(payload, tmp)
            rank_zero_info(f"BDGF: DDPM saved to {path}")
        self.sources["DDPM"], self.payload = "built", payload
        return payload

    def _cached_ddpm(self, path: Path) -> dict | None:
        if not path.is_file():
            return None
        try:
            payload = load_ddpm_payload(path)
            self.check_payload(payload, path)
            return payload
        except InputError as err:
            rank_zero_warn(f"BDGF: cached DDPM is unusable ({err}); pretraining again")
            return None


def guide_layout(guide_levels: Mapping[str, int], in_channels: Mapping[str, int], *, feature_bank: str | None,
                 feature_bank_split: Sequence[int] | None, ddpm: Mapping[str, Any] | None, levels: Sequence[int],
                 timesteps: int, reduction: str) -> tuple[dict[str, tuple[int, int]], int]:
    """Which channels of the bank each guided branch reads ({branch: (start, stop)}), and the bank's size.

    A DDPM bank holds the decoder ``levels`` in order (``guide_levels`` values are decoder levels); a
    given ``feature_bank`` holds the blocks of ``feature_bank_split`` (``guide_levels`` values index
    them), or one block every guided branch reads whole.
    """
    if not guide_levels:
        return {}, 0
    levels = [int(level) for level in levels]
    if feature_bank is not None:
        total = external_bank_channels(feature_bank)
        if not feature_bank_split:
            return {b: (0, total) for b in guide_levels}, total
        if sum(feature_bank_split) != total or min(feature_bank_split) < 1:
            raise ValueError(f"feature_bank_split {list(feature_bank_split)} must be positive and sum to "
                             f"the bank's {total} channels")
        blocks, positions, names = [int(c) for c in feature_bank_split], dict(guide_levels), "feature_bank_split blocks"
    else:
        with torch.device("meta"):
            config = resolve_ddpm_config(ddpm)
            unet = MultimodalDenoiserUNet(in_channels, **{k: config[k] for k in DENOISER_KEYS})
        widths = feature_cube_channels(unet, levels, timesteps, reduction)
        missing = {b: level for b, level in guide_levels.items() if level not in widths}
        if missing:
            raise ValueError(f"guide_levels {missing} must be among feature_levels {levels}")
        unused = sorted(set(levels) - set(guide_levels.values()))
        if unused:
            raise ValueError(f"feature_levels {unused} would be extracted and cached but no branch reads them "
                             f"(guide_levels {dict(guide_levels)}): drop them from feature_levels")
        blocks, names = list(widths.values()), f"feature_levels {levels}"
        positions = {b: levels.index(level) for b, level in guide_levels.items()}
    offsets = np.concatenate([[0], np.cumsum(blocks)]).astype(int).tolist()
    slices = {}
    for b, position in positions.items():
        if not 0 <= position < len(blocks):
            raise ValueError(f"guide_levels[{b!r}] = {position} is not among the {names}")
        slices[b] = (offsets[position], offsets[position + 1])
    return slices, sum(blocks)
