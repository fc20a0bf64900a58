"""Where tiles and windows sit on a scene's reference grid: every tile origin of the suite comes from here.

Origins are (row, col) of a tile's top-left pixel. Five layouts are in use:

- :func:`covering_tiles`: tiles covering every pixel exactly once (evaluation and prediction of
  ``tile`` sampling, windowed prediction);
- :func:`strided_tiles`: overlapping training tiles centred on a ``stride`` grid (``tile`` sampling);
- :func:`grid_windows`: the non-overlapping blocks a scene is read in (windowed prediction,
  streaming statistics);
- :func:`sliding_tiles` over :func:`padded_shape`: overlapping tiles over a scene padded to a whole
  number of strides (BDGF's feature extraction);
- :func:`random_origins`: uniform random tiles inside the scene (BDGF's DDPM pretraining).
"""
from __future__ import annotations

import numpy as np
import torch

Window = tuple[int, int, int, int]  # rows r0:r1, cols c0:c1 on the reference grid


def grid_origins(length: int, tile: int, stride: int) -> np.ndarray:
    """Tile starts at ``stride`` steps, plus a last tile flush with the end, so every index is covered."""
    if length <= tile:
        return np.zeros(1, dtype=np.int64)
    starts = np.arange(0, length - tile + 1, stride)
    if starts[-1] + tile < length:
        starts = np.append(starts, length - tile)
    return starts.astype(np.int64)


def covering_tiles(shape: tuple[int, int], tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Tiles covering every pixel exactly once: (origins (n, 2), first owned local row/col (n, 2)).

    Tiles sit on a ``tile`` grid; the last row/column of tiles is shifted flush with the image edge
    and owns only the pixels the previous tile did not (the authors' tiling dropped those edges).
    """
    per_axis = []
    for length in shape:
        starts = grid_origins(length, tile, tile)
        keep = np.zeros_like(starts)
        if len(starts) > 1:
            keep[-1] = starts[-2] + tile - starts[-1]
        per_axis.append((starts, keep))
    (ys, kys), (xs, kxs) = per_axis
    origins = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2).astype(np.int64)
    keep = np.stack(np.meshgrid(kys, kxs, indexing="ij"), -1).reshape(-1, 2).astype(np.int64)
    return origins, keep


def strided_tiles(shape: tuple[int, int], tile: int, stride: int) -> np.ndarray:
    """Training tiles (n, 2), row-major: one every ``stride`` pixels from half a tile before the
    image, so every pixel, edges included, falls near some tile's centre; tiles may reach past the
    image (those pixels are the scene's padding, unlabelled)."""
    ys, xs = (np.arange(-(tile // 2), max(length - tile // 2, 1), stride) for length in shape)
    return np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2).astype(np.int64)


def grid_windows(shape: tuple[int, int], size: int) -> list[Window]:
    """Non-overlapping ``size`` x ``size`` blocks covering the grid, row-major (the last ones clipped)."""
    h, w = shape
    return [(r, min(r + size, h), c, min(c + size, w)) for r in range(0, h, size) for c in range(0, w, size)]


def padded_length(length: int, tile: int, stride: int) -> int:
    """The smallest length >= ``length`` that ``tile``-long tiles at ``stride`` steps cover exactly."""
    if length <= tile:
        return tile
    return tile + -(-(length - tile) // stride) * stride


def padded_shape(shape: tuple[int, int], tile: int, stride: int) -> tuple[int, int]:
    """:func:`padded_length` of both axes: the grid :func:`sliding_tiles` tiles exactly."""
    return padded_length(shape[0], tile, stride), padded_length(shape[1], tile, stride)


def sliding_tiles(shape: tuple[int, int], tile: int, stride: int) -> list[tuple[int, int]]:
    """Origins of ``tile`` tiles at ``stride`` steps that fit inside ``shape``, row-major; on a
    :func:`padded_shape` grid they cover it exactly (no tile flush-shifted, unlike :func:`covering_tiles`)."""
    ys, xs = (range(0, length - tile + 1, stride) for length in shape)
    return [(y, x) for y in ys for x in xs]


def random_origins(shape: tuple[int, int], tile: int, count: int,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` uniform random tile origins inside ``shape`` (rows, cols), drawn rows first from
    ``generator`` (the global torch generator when None); the scene must be at least ``tile`` a side."""
    h, w = shape
    if h < tile or w < tile:
        raise ValueError(f"a {h}x{w} scene is smaller than the {tile}x{tile} tile; pad it first")
    ys = torch.randint(0, h - tile + 1, (count,), generator=generator)
    xs = torch.randint(0, w - tile + 1, (count,), generator=generator)
    return ys, xs


def block_mask(mask: np.ndarray, ratio: int) -> np.ndarray:
    """A reference-grid mask on a grid ``ratio`` times finer (each pixel becomes a ratio x ratio block)."""
    return mask if ratio == 1 else np.repeat(np.repeat(mask, ratio, axis=0), ratio, axis=1)


def coarse_valid(valid: np.ndarray, ratio: int) -> np.ndarray:
    """A reference pixel is valid only if its whole block of finer pixels is valid."""
    if ratio == 1:
        return valid
    h, w = valid.shape[0] // ratio, valid.shape[1] // ratio
    return valid.reshape(h, ratio, w, ratio).all(axis=(1, 3))
