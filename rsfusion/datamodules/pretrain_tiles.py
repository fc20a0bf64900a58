"""Unlabelled training tiles of a whole scene: what BDGF's DDPM (stage 1) learns from.

:class:`RandomSceneTiles` draws random ``tile`` x ``tile`` crops (with random flips and rot90) of
the stacked, normalised modalities; labels are never read. The draws come from the global torch
RNG, so a seeded run is reproducible and, under DDP, ranks seeded differently see different tiles.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from rsfusion.datamodules.errors import InputError
from rsfusion.datamodules.tiling import random_origins

__all__ = ["RandomSceneTiles", "pad_to_tile", "random_tiles", "unpadded_modalities"]


def pad_to_tile(x: Tensor, tile: int) -> Tensor:
    """Reflect-pad (C, H, W) at the bottom/right so both sides are at least ``tile``."""
    ph, pw = max(0, tile - x.shape[1]), max(0, tile - x.shape[2])
    if ph == pw == 0:
        return x
    mode = "reflect" if ph < x.shape[1] and pw < x.shape[2] else "replicate"
    return F.pad(x[None], (0, pw, 0, ph), mode=mode)[0]


def random_tiles(scene: Tensor, count: int, tile: int, generator: torch.Generator | None = None) -> Tensor:
    """``count`` random ``tile`` x ``tile`` crops of (C, H, W) ``scene`` with random flips and rot90."""
    ys, xs = random_origins(tuple(scene.shape[1:]), tile, count, generator)
    turns = torch.randint(0, 4, (count,), generator=generator)
    flips = torch.randint(0, 2, (count,), generator=generator)
    out = []
    for y, x, k, f in zip(ys.tolist(), xs.tolist(), turns.tolist(), flips.tolist()):
        t = torch.rot90(scene[:, y:y + tile, x:x + tile], k, dims=(1, 2))
        out.append(t.flip(-1) if f else t)
    return torch.stack(out)


def unpadded_modalities(scene, names) -> dict[str, np.ndarray]:
    """The normalised (C, H, W) arrays of ``names`` of a loaded :class:`~rsfusion.datamodules.scene.Scene`
    without its reflect padding; every modality must lie on the reference grid."""
    bad = [n for n in names if scene.ratios.get(n, 1) != 1]
    if bad:
        raise InputError(f"unlabelled tiles need every modality on one grid; {bad} are finer than the reference "
                         "grid (resample them first)")
    p = scene.pad
    return {n: scene.data[n][:, p:scene.data[n].shape[1] - p, p:scene.data[n].shape[2] - p] for n in names}


class RandomSceneTiles(Dataset):
    """Random unlabelled tiles of a whole scene: ``{"x0": (C, tile, tile)}``.

    ``scene`` (C, H, W) stacks the modalities; ``length`` tiles make one epoch.
    """

    def __init__(self, scene: Tensor, tile: int, length: int):
        if length < 1:
            raise ValueError(f"tiles_per_epoch must be >= 1, got {length}")
        self.scene, self.tile, self.length = pad_to_tile(scene.float(), tile), tile, length

    @classmethod
    def of_scene(cls, scene, names, tile: int, length: int) -> "RandomSceneTiles":
        """Tiles of the modalities ``names`` (stacked in that order) of a loaded scene."""
        arrays = unpadded_modalities(scene, names)
        return cls(torch.from_numpy(np.concatenate([arrays[n] for n in names], axis=0).copy()), tile, length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"x0": random_tiles(self.scene, 1, self.tile)[0]}
