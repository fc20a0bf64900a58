"""Patches, tiles, normalisation and splits, checked against direct array arithmetic."""
from __future__ import annotations

import numpy as np
import pytest

from rsfusion.datamodules import RasterDataModule
from rsfusion.datamodules.io import read_raster
from rsfusion.datamodules.sampling import IGNORE_INDEX, covering_tiles
from rsfusion.datamodules.scene import fit_band_stats
from rsfusion.datamodules.splits import block_split, pixels_inside_patches
from tests.conftest import write_tif


def _split_labels(shape, rng):
    labels = rng.integers(1, 4, size=shape).astype(np.uint8)
    coin = rng.random(shape)
    return np.where(coin < 0.3, labels, 0).astype(np.uint8), np.where(coin > 0.6, labels, 0).astype(np.uint8)


@pytest.mark.parametrize("patch_size", [5, 6])
def test_pixel_patches_equal_direct_slicing(tmp_path, patch_size):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(3, 17, 23)).astype(np.float32)
    train, test = _split_labels((17, 23), rng)
    path = write_tif(tmp_path / "x.tif", data)
    dm = RasterDataModule({"x": str(path)}, train_labels=str(write_tif(tmp_path / "tr.tif", train)),
                          test_labels=str(write_tif(tmp_path / "te.tif", test)), patch_size=patch_size,
                          normalization="none", allow_even_patch=True)
    dm.setup("test")
    before = (patch_size - 1) // 2
    padded = np.pad(data, ((0, 0), (patch_size, patch_size), (patch_size, patch_size)), mode="reflect")
    batch = dm.test_dataset.__getitems__(np.arange(len(dm.test_dataset)))
    for i, (r, c) in enumerate(zip(dm.test_dataset.rows, dm.test_dataset.cols)):
        y0, x0 = r - before + patch_size, c - before + patch_size
        np.testing.assert_array_equal(batch["x"][i].numpy(), padded[:, y0:y0 + patch_size, x0:x0 + patch_size])
        assert batch["label"][i] == test[r, c] - 1
    assert len(dm.test_dataset) == (test > 0).sum()


def test_ms_pan_patches_cover_the_same_ground(tmp_path):
    """Pixel values encode their own ground coordinates, so aligned patches agree everywhere."""
    h, w, r = 12, 10, 4
    yy, xx = np.mgrid[0:h, 0:w]
    ms = np.stack([yy * 1000 + xx, yy, xx, yy + xx]).astype(np.float32)
    fy, fx = np.mgrid[0:h * r, 0:w * r]
    pan = ((fy // r) * 1000 + fx // r).astype(np.float32)
    ms_path = write_tif(tmp_path / "ms.tif", ms, res=4.0)
    pan_path = write_tif(tmp_path / "pan.tif", pan, res=1.0)
    train, test = _split_labels((h, w), np.random.default_rng(1))
    dm = RasterDataModule({"ms": str(ms_path), "pan": str(pan_path)},
                          train_labels=str(write_tif(tmp_path / "tr.tif", train, res=4.0)),
                          test_labels=str(write_tif(tmp_path / "te.tif", test, res=4.0)),
                          patch_size=4, normalization="none", allow_even_patch=True)
    assert dm.ratios == {"ms": 1, "pan": 4}
    dm.setup("test")
    rows, cols = dm.test_dataset.rows, dm.test_dataset.cols
    batch = dm.test_dataset.__getitems__(np.arange(len(rows)))
    assert batch["ms"].shape[1:] == (4, 4, 4) and batch["pan"].shape[1:] == (1, 16, 16)
    # inside the image every PAN block averages to its MS pixel (reflect padding at the borders
    # mirrors each grid at its own resolution, as the authors' padding does)
    inside = (rows >= 1) & (rows + 2 < h) & (cols >= 1) & (cols + 2 < w)
    assert inside.sum() > 5
    block_mean = batch["pan"][inside, 0].reshape(-1, 4, 4, 4, 4).float().mean(dim=(2, 4))
    np.testing.assert_array_equal(block_mean.numpy(), batch["ms"][inside, 0].numpy())
    # the sampled pixel sits at index (p-1)//2 = 1 of its MS patch and rows 4..7 of its PAN patch
    np.testing.assert_array_equal(batch["ms"][:, 0, 1, 1].numpy(), rows * 1000 + cols)
    np.testing.assert_array_equal(batch["pan"][:, 0, 4:8, 4:8].numpy(),
                                  np.broadcast_to((rows * 1000 + cols)[:, None, None], (len(rows), 4, 4)))


@pytest.mark.parametrize("shape,tile", [((70, 45), 32), ((20, 13), 32), ((64, 64), 32), ((33, 31), 8)])
def test_covering_tiles_own_every_pixel_exactly_once(shape, tile):
    origins, keep = covering_tiles(shape, tile)
    count = np.zeros(shape, dtype=int)
    for (y, x), (ky, kx) in zip(origins, keep):
        count[y + ky:min(y + tile, shape[0]), x + kx:min(x + tile, shape[1])] += 1
    assert (count == 1).all()


def test_tile_evaluation_counts_each_test_pixel_once(tmp_path):
    rng = np.random.default_rng(2)
    shape = (45, 38)
    train, test = _split_labels(shape, rng)
    dm = RasterDataModule({"x": str(write_tif(tmp_path / "x.tif", rng.normal(size=(2, *shape)).astype(np.float32)))},
                          train_labels=str(write_tif(tmp_path / "tr.tif", train)),
                          test_labels=str(write_tif(tmp_path / "te.tif", test)), sampling="tile", patch_size=16)
    dm.setup("test")
    batch = dm.test_dataset.__getitems__(np.arange(len(dm.test_dataset)))
    labels = batch["label"].numpy()
    assert (labels != IGNORE_INDEX).sum() == (test > 0).sum()
    assert np.array_equal(np.bincount(labels[labels >= 0]), np.bincount(test[test > 0] - 1))


def test_normalisation_uses_valid_pixels_and_survives_constant_bands():
    pixels = np.stack([np.arange(10.0), np.full(10, 7.0)])
    stats = fit_band_stats(pixels, "zscore", None)
    out = stats.apply(pixels[:, :, None])[:, :, 0]
    np.testing.assert_allclose(out[0].mean(), 0, atol=1e-6)
    np.testing.assert_allclose(out[0].std(), 1, atol=1e-5)
    np.testing.assert_array_equal(out[1], 0)  # constant band: no division by zero
    minmax = fit_band_stats(pixels, "minmax", None).apply(pixels[:, :, None])[:, :, 0]
    np.testing.assert_allclose(minmax[0], np.arange(10) / 9, rtol=1e-6)
    clipped = fit_band_stats(np.arange(101.0)[None], "minmax", 10).apply(np.array([[[0.0], [100.0]]]))
    np.testing.assert_allclose(clipped.ravel(), [0, 1])


def test_block_split_is_disjoint_stratified_and_guarded():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.repeat(rng.integers(1, 4, size=(8, 8)), 8, 0), 8, 1).astype(np.uint8)
    kept, held = block_split(labels, 0.3, block_size=8, seed=0, guard=2)
    assert not ((kept > 0) & (held > 0)).any()
    for k in (1, 2, 3):
        frac = (held == k).sum() / (labels == k).sum()
        assert 0.1 < frac < 0.6 and (kept == k).any()
    # no kept pixel lies within 2 pixels of a held-out pixel
    near = np.zeros_like(held, dtype=bool)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            near |= np.roll(np.roll(held > 0, dy, 0), dx, 1)
    assert not (near & (kept > 0))[2:-2, 2:-2].any()


@pytest.mark.parametrize("patch_size", [1, 4, 5])
def test_leakage_count_matches_brute_force(patch_size):
    rng = np.random.default_rng(4)
    train = (rng.random((20, 25)) < 0.05).astype(int)
    test = ((rng.random((20, 25)) < 0.3) & (train == 0)).astype(int)
    before, after = (patch_size - 1) // 2, patch_size // 2
    covered = np.zeros_like(train, dtype=bool)
    for r, c in zip(*np.nonzero(train)):
        covered[max(0, r - before):r + after + 1, max(0, c - before):c + after + 1] = True
    assert pixels_inside_patches(train, test, patch_size) == (covered & (test > 0)).sum()


def test_synthetic_scene_needs_both_modalities(tiny_hsi_scene):
    """Trees and grass share spectra; only elevation tells them apart (and the reverse for roofs/trees)."""
    hsi = read_raster(tiny_hsi_scene["hsi"]).data
    dsm = read_raster(tiny_hsi_scene["dsm"]).data[0]
    train = read_raster(tiny_hsi_scene["train"]).data[0]
    trees, grass, roofs = train == 1, train == 2, train == 3
    same_spectrum = np.abs(hsi[:, trees].mean(1) - hsi[:, grass].mean(1)).max()
    different_spectrum = np.abs(hsi[:, trees].mean(1) - hsi[:, roofs].mean(1)).max()
    assert different_spectrum > 5 * same_spectrum
    height_gap = dsm[trees].mean() - dsm[grass].mean()
    assert height_gap > 4 and abs(dsm[trees].mean() - dsm[roofs].mean()) < 0.5 * height_gap
