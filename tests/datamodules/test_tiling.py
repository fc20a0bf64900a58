"""Tile and window layouts (rsfusion.datamodules.tiling), checked by counting the pixels they cover."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rsfusion.datamodules.tiling import (
    covering_tiles,
    grid_windows,
    padded_shape,
    random_origins,
    sliding_tiles,
    strided_tiles,
)


@pytest.mark.parametrize("shape,tile", [((70, 45), 32), ((20, 13), 32), ((64, 64), 32), ((33, 31), 8)])
def test_covering_tiles_own_every_pixel_exactly_once(shape, tile):
    origins, keep = covering_tiles(shape, tile)
    count = np.zeros(shape, dtype=int)
    for (y, x), (ky, kx) in zip(origins, keep):
        count[y + ky:min(y + tile, shape[0]), x + kx:min(x + tile, shape[1])] += 1
    assert (count == 1).all()
    assert (origins >= 0).all() and (keep >= 0).all() and (keep < tile).all()


@pytest.mark.parametrize("shape,tile,stride", [((45, 38), 16, 8), ((10, 7), 16, 4), ((64, 64), 32, 32)])
def test_strided_tiles_start_half_a_tile_out_and_put_every_pixel_near_a_centre(shape, tile, stride):
    origins = strided_tiles(shape, tile, stride)
    assert origins.dtype == np.int64 and origins[0].tolist() == [-(tile // 2), -(tile // 2)]
    steps = np.unique(np.diff(np.unique(origins[:, 0])))
    assert steps.size == 0 or steps.tolist() == [stride]
    assert origins.max(axis=0).tolist() <= [shape[0] - 1, shape[1] - 1]  # every tile touches the image
    centres = origins + tile // 2
    for axis, length in enumerate(shape):
        distance = np.abs(np.arange(length)[:, None] - np.unique(centres[:, axis])[None]).min(axis=1)
        assert distance.max() <= stride  # every row/column lies within one stride of a tile centre


@pytest.mark.parametrize("shape,size", [((45, 38), 16), ((7, 7), 7), ((5, 9), 100)])
def test_grid_windows_partition_the_grid_row_major(shape, size):
    windows = grid_windows(shape, size)
    count = np.zeros(shape, dtype=int)
    for r0, r1, c0, c1 in windows:
        assert 0 < r1 - r0 <= size and 0 < c1 - c0 <= size
        count[r0:r1, c0:c1] += 1
    assert (count == 1).all()
    assert windows == sorted(windows)


@pytest.mark.parametrize("shape,tile,stride", [((45, 38), 32, 16), ((20, 13), 32, 16), ((64, 64), 32, 32),
                                               ((33, 70), 8, 6)])
def test_sliding_tiles_cover_the_padded_grid_exactly(shape, tile, stride):
    padded = padded_shape(shape, tile, stride)
    assert padded[0] >= shape[0] and padded[1] >= shape[1]
    assert all(p == tile or (p - tile) % stride == 0 for p in padded)
    assert all(p - s < stride or p == tile for p, s in zip(padded, shape))  # the smallest such grid
    count = np.zeros(padded, dtype=int)
    for y, x in sliding_tiles(padded, tile, stride):
        count[y:y + tile, x:x + tile] += 1
    assert (count >= 1).all()
    assert count[:stride, :stride].max() == 1  # the top-left corner belongs to the first tile only


def test_random_origins_are_uniform_inside_and_reproducible():
    ys, xs = random_origins((40, 20), 8, 4000, torch.Generator().manual_seed(3))
    again = random_origins((40, 20), 8, 4000, torch.Generator().manual_seed(3))
    assert torch.equal(ys, again[0]) and torch.equal(xs, again[1])
    assert ys.min() == 0 and ys.max() == 32 and xs.min() == 0 and xs.max() == 12
    assert abs(ys.float().mean().item() - 16) < 0.6 and abs(xs.float().mean().item() - 6) < 0.3
    # rows are drawn before columns from the one generator (BDGF's pretraining order of draws)
    generator = torch.Generator().manual_seed(3)
    assert torch.equal(ys, torch.randint(0, 33, (4000,), generator=generator))
    assert torch.equal(xs, torch.randint(0, 13, (4000,), generator=generator))
    with pytest.raises(ValueError, match="smaller than the 8x8 tile"):
        random_origins((7, 20), 8, 1)
