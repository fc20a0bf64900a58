"""Training-batch augmentation: flips and 90-degree rotations (the dihedral group), Gaussian noise.

Whole batches are transformed at once with torch ops on the batch's device (one gather per tensor),
after the vectorised patch gather, by :meth:`~rsfusion.datamodules.raster.RasterDataModule.on_after_batch_transfer`
on training batches only. The draws depend only on (seed, epoch, rank, batch index), so a resumed
run augments exactly as an uninterrupted one, whatever the number of loader workers.
"""
from __future__ import annotations

from typing import Mapping, TypedDict

import numpy as np
import torch
from torch import Tensor

from rsfusion.datamodules.errors import InputError

Batch = dict[str, Tensor]


class Augment(TypedDict, total=False):
    """The ``augment`` option of the DataModules: every key optional, everything off by default.

    flip: random left-right and up-down flips. rotate: random rotations by multiples of 90 degrees
    (both: all 8 transforms of the square, equally likely). noise_std: Gaussian noise of this standard
    deviation in normalised units added to every raster modality, or ``{modality: std}`` for some.
    """

    flip: bool
    rotate: bool
    noise_std: float | dict[str, float]


def dihedral_index_maps(n: int, device: torch.device | str = "cpu") -> Tensor:
    """(8, n n) gather indices: code c = k + 4 f is ``numpy.rot90(x, k)`` over the last two axes, then,
    if f = 1, a left-right flip (``numpy.flip(x, -1)``)."""
    base = torch.arange(n * n, device=device).reshape(n, n)
    maps = []
    for code in range(8):
        out = torch.rot90(base, code % 4, dims=(0, 1))
        maps.append((out.flip(-1) if code >= 4 else out).reshape(-1))
    return torch.stack(maps)


def dihedral(x: Tensor, codes: Tensor) -> Tensor:
    """Transform each sample ``x[b]`` (..., n, n) by the dihedral code ``codes[b]``
    (see :func:`dihedral_index_maps`)."""
    n = x.shape[-1]
    if x.shape[-2] != n:
        raise ValueError(f"flips and rotations need square patches, got {tuple(x.shape[-2:])}")
    index = dihedral_index_maps(n, x.device)[codes]  # (B, n n)
    flat = x.reshape(x.shape[0], -1, n * n)
    return flat.gather(2, index[:, None, :].expand_as(flat)).reshape(x.shape)


def batch_generator(seed: int, epoch: int, rank: int, batch_idx: int, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded by (seed, epoch, rank, batch index) only."""
    state = np.random.SeedSequence([seed % 2 ** 64, epoch, rank, batch_idx]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & (2 ** 63 - 1))


class BatchAugmenter:
    """Draws and applies the configured augmentation to a training batch (:class:`Augment`).

    Every tensor with spatial axes (modalities, whatever their resolution, and dense label tiles)
    gets the same flip/rotation per sample, so modalities and labels stay aligned pixel for pixel:
    a transform of the square maps a fine modality's r x r block of a coarse pixel onto the block of
    that pixel's image. Per-pixel labels (B,) are unchanged (a pixel patch turns about its pixel).
    """

    def __init__(self, config: Mapping | None, modalities: list[str]):
        config = dict(config or {})
        unknown = sorted(set(config) - set(Augment.__annotations__))
        if unknown:
            raise InputError(f"augment: unknown keys {unknown}; known: {sorted(Augment.__annotations__)}")
        self.flip, self.rotate = bool(config.get("flip", False)), bool(config.get("rotate", False))
        noise = config.get("noise_std", 0.0) or 0.0
        noise = dict(noise) if isinstance(noise, Mapping) else {name: float(noise) for name in modalities}
        missing = [name for name in noise if name not in modalities]
        if missing:
            raise InputError(f"augment.noise_std: unknown modalities {missing}; the modalities are {modalities}")
        bad = {name: std for name, std in noise.items() if not (np.isfinite(std) and std >= 0)}
        if bad:
            raise InputError(f"augment.noise_std must be finite and >= 0, got {bad}")
        self.noise = {name: float(std) for name, std in noise.items() if std > 0}

    @property
    def geometric(self) -> bool:
        return self.flip or self.rotate

    @property
    def active(self) -> bool:
        return self.geometric or bool(self.noise)

    def draw_codes(self, size: int, generator: torch.Generator) -> Tensor:
        """Dihedral codes for ``size`` samples, uniform over the transforms the options allow."""
        device = generator.device
        if self.flip and self.rotate:
            return torch.randint(0, 8, (size,), generator=generator, device=device)
        allowed = [0, 1, 2, 3] if self.rotate else [0, 2, 4, 6]  # flips only: identity, 180, left-right, up-down
        pick = torch.randint(0, 4, (size,), generator=generator, device=device)
        return torch.tensor(allowed, device=device)[pick]

    def __call__(self, batch: Batch, generator: torch.Generator, extra: int = 0, cut: int = 0) -> Batch:
        """The augmented batch. ``extra`` > 0: patches were cut ``extra`` reference pixels larger at the
        top and left (``cut`` in all, centred on their pixel) so that the transform pivots on the
        labelled pixel of an even patch; that border is removed afterwards."""
        out = dict(batch)
        if self.geometric:
            size = next(v.shape[0] for v in batch.values() if v.ndim >= 3)
            codes = self.draw_codes(size, generator)
            for key, value in batch.items():
                if value.ndim >= 3:
                    value = dihedral(value, codes)
                    if extra:
                        crop = value.shape[-1] * extra // cut
                        value = value[..., crop:, crop:].contiguous()
                    out[key] = value
        for name, std in self.noise.items():
            if name not in out:
                raise InputError(f"augment.noise_std: modality {name!r} is not in the training batch "
                                 f"(keys {sorted(out)})")
            x = out[name]
            out[name] = x + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return out
