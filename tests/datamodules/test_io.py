"""Raster reading and checking, on rasters nobody in this project made (../shared/data/real-rasters)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.io

from rsfusion.datamodules import RasterDataModule, RasterError
from rsfusion.datamodules.io import read_labels, read_raster
from rsfusion.datamodules.writing import atomic_path
from tests.conftest import write_tif


def write_labels_like(src_path, labels: np.ndarray, out):
    """A uint8 label raster on the grid of ``src_path``."""
    import rasterio

    with rasterio.open(src_path) as src:
        return write_tif_like(src, labels, out)


def write_tif_like(src, labels, out):
    import rasterio

    with rasterio.open(out, "w", driver="GTiff", height=labels.shape[0], width=labels.shape[1], count=1,
                       dtype="uint8", crs=src.crs, transform=src.transform) as dst:
        dst.write(labels.astype(np.uint8)[None])
    return out


def _rgb_labels(rgb, tmp_path):
    """Train/test maps on RGB.byte.tif; the train map also labels the nodata left edge."""
    raster = read_raster(rgb)
    train = np.zeros(raster.shape, np.uint8)
    train[300:340, 300:420], train[340:420, 300:420] = 1, 2
    train[:, :5] = 3  # the left edge is nodata: these labels must never become samples
    test = np.zeros(raster.shape, np.uint8)
    test[500:540, 500:560], test[540:560, 500:560], test[200:210, 200:210] = 1, 2, 3
    return write_labels_like(rgb, train, tmp_path / "train.tif"), write_labels_like(rgb, test, tmp_path / "test.tif")


def test_nodata_border_never_becomes_a_sample(real_rasters, tmp_path):
    rgb = real_rasters / "RGB.byte.tif"
    raster = read_raster(rgb)
    assert 0.6 < raster.valid.mean() < 0.75  # the rotated footprint's black border is masked
    assert not raster.valid[:, :5].any()
    train, test = _rgb_labels(rgb, tmp_path)
    dm = RasterDataModule({"rgb": str(rgb)}, train_labels=str(train), test_labels=str(test), patch_size=5,
                          batch_size=512)
    dm.setup("fit")
    rows, cols = dm.train_dataset.rows, dm.train_dataset.cols
    assert raster.valid[rows, cols].all() and (cols >= 5).all()
    assert set(np.unique(dm.train_dataset.labels)) <= {0, 1}  # class 3 lived only on nodata
    # nodata pixels are filled with the band mean (0 after z-scoring), never the raw 0 sentinel
    sentinel = (0 - dm.scene.normalizers["rgb"].stats.offset) / dm.scene.normalizers["rgb"].stats.scale
    for batch in dm.train_dataloader():
        patches = batch["rgb"].numpy()
        assert not np.isclose(patches, sentinel[None, :, None, None]).all(axis=1).any()


def test_rasters_in_different_crs_are_refused(real_rasters, tmp_path):
    rgb, shade = real_rasters / "RGB.byte.tif", real_rasters / "shade.tif"
    train, test = _rgb_labels(rgb, tmp_path)
    with pytest.raises(RasterError,
                       match=r"RGB\.byte\.tif and .*shade\.tif: different CRS \(EPSG:32618 vs EPSG:3857\)"):
        RasterDataModule({"rgb": str(rgb), "shade": str(shade)}, train_labels=str(train), test_labels=str(test))


def test_corrupt_raster_gives_one_line_error_naming_the_file(real_rasters):
    with pytest.raises(RasterError) as err:
        read_raster(real_rasters / "corrupt.tif")
    message = str(err.value)
    assert "corrupt.tif" in message and "unreadable or corrupt" in message and "\n" not in message
    assert err.value.__cause__ is None  # no chained traceback


def test_float_nodata_sentinel_never_reaches_a_batch(real_rasters, tmp_path):
    path = real_rasters / "float_raster_with_nodata.tif"
    raster = read_raster(path)
    assert raster.nodata < -1e38 and 0 < raster.valid.sum() < raster.valid.size
    order = np.cumsum(raster.valid).reshape(raster.shape)
    train = np.where(raster.valid & (order % 2 == 0), 1 + order % 4 // 2, 0)
    test = np.where(raster.valid & (order % 2 == 1), 1 + order % 4 // 2, 0)
    tr, te = write_labels_like(path, train, tmp_path / "tr.tif"), write_labels_like(path, test, tmp_path / "te.tif")
    dm = RasterDataModule({"f": str(path)}, train_labels=str(tr), test_labels=str(te), val_labels=str(tr),
                          patch_size=5, batch_size=4096)
    dm.setup(None)
    for loader in (dm.train_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        for batch in loader:
            values = batch["f"].numpy()
            assert np.isfinite(values).all() and np.abs(values).max() < 100


def test_equivalent_crs_written_differently_is_accepted(tmp_path):
    a = write_tif(tmp_path / "a.tif", np.ones((2, 8, 8), np.float32), crs="EPSG:32632")
    b = write_tif(tmp_path / "b.tif", np.ones((1, 8, 8), np.float32),
                  crs="+proj=utm +zone=32 +datum=WGS84 +units=m +no_defs")
    tr = write_tif(tmp_path / "tr.tif", np.eye(8, dtype=np.uint8))
    te = write_tif(tmp_path / "te.tif", np.triu(np.ones((8, 8), np.uint8), 5))
    dm = RasterDataModule({"a": str(a), "b": str(b)}, train_labels=str(tr), test_labels=str(te), val_labels=str(tr),
                          patch_size=3)
    assert dm.in_channels == {"a": 2, "b": 1}


@pytest.mark.parametrize("case,message", [
    ("extent", "different extents"),
    ("offset", "misaligned pixel grids"),
    ("ratio", "are not an integer ratio"),
])
def test_grid_mismatches_name_both_files(tmp_path, case, message):
    a = write_tif(tmp_path / "a.tif", np.ones((1, 8, 8), np.float32))
    if case == "extent":
        b = write_tif(tmp_path / "b.tif", np.ones((1, 9, 8), np.float32))
    elif case == "offset":
        b = write_tif(tmp_path / "b.tif", np.ones((1, 8, 8), np.float32), origin=(500_003.0, 4_000_000.0))
    else:
        b = write_tif(tmp_path / "b.tif", np.ones((1, 20, 20), np.float32), res=4.0)
    labels = write_tif(tmp_path / "l.tif", np.ones((8, 8), np.uint8))
    with pytest.raises(RasterError, match=rf"a\.tif and .*b\.tif: .*{message}"):
        RasterDataModule({"a": str(a), "b": str(b)}, train_labels=str(labels), test_labels=str(labels))


def test_missing_file_and_mat_keys(tmp_path):
    with pytest.raises(RasterError, match=r"nope\.tif: file not found"):
        read_raster(tmp_path / "nope.tif")
    scipy.io.savemat(tmp_path / "d.mat", {"HSI": np.ones((4, 5, 3)), "other": np.zeros((4, 5))})
    assert read_raster(f"{tmp_path / 'd.mat'}:HSI").data.shape == (3, 4, 5)
    with pytest.raises(RasterError, match=r"no key 'data' in \.mat file; keys found: \['HSI', 'other'\]"):
        read_raster(f"{tmp_path / 'd.mat'}:data")


def test_matlab_v73_files_are_read_through_hdf5(tmp_path):
    import h5py

    cube = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)  # (H, W, C) as MATLAB sees it
    with h5py.File(tmp_path / "v73.mat", "w") as f:
        f["data"] = cube.T  # MATLAB stores column-major: HDF5 holds the transpose
    np.testing.assert_array_equal(read_raster(f"{tmp_path / 'v73.mat'}:data").data, np.moveaxis(cube, -1, 0))
    (tmp_path / "junk.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(RasterError, match=r"junk\.mat: cannot read \.mat file"):
        read_raster(tmp_path / "junk.mat")


def test_label_values_are_checked(tmp_path):
    bad = write_tif(tmp_path / "neg.tif", np.array([[0, -1], [1, 2]], np.int16))
    with pytest.raises(RasterError, match="negative label value"):
        read_labels(bad)
    high = write_tif(tmp_path / "high.tif", np.array([[0, 7], [1, 2]], np.uint8))
    with pytest.raises(RasterError, match=r"label value 7 is above the number of classes \(3\)"):
        read_labels(high, num_classes=3)
    frac = write_tif(tmp_path / "frac.tif", np.array([[0, 1.5], [1, 2]], np.float32))
    with pytest.raises(RasterError, match="whole numbers"):
        read_labels(frac)


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "map.tif"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half-writ")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]
