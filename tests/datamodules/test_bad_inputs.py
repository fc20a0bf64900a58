"""Bad input gets one clear line naming the file and the problem, raised before any training."""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine

from rsfusion.datamodules import RasterDataModule, RasterError
from rsfusion.datamodules.io import read_raster
from tests.conftest import write_tif


@pytest.fixture
def grid(tmp_path):
    """An 8x8 two-modality scene with disjoint train/test maps."""
    rng = np.random.default_rng(0)
    a = write_tif(tmp_path / "a.tif", rng.normal(size=(3, 8, 8)).astype(np.float32))
    b = write_tif(tmp_path / "b.tif", rng.normal(size=(1, 8, 8)).astype(np.float32))
    train = np.zeros((8, 8), np.uint8)
    train[1, 1], train[2, 5], train[6, 2] = 1, 2, 2
    test = np.zeros((8, 8), np.uint8)
    test[5, 5], test[7, 7], test[0, 6] = 1, 2, 1
    return {"a": a, "b": b, "train": write_tif(tmp_path / "train.tif", train),
            "test": write_tif(tmp_path / "test.tif", test), "dir": tmp_path}


def _dm(grid, **kw):
    args = dict(modalities={"a": str(grid["a"]), "b": str(grid["b"])}, train_labels=str(grid["train"]),
                test_labels=str(grid["test"]), val_labels=str(grid["train"]), patch_size=3)
    args.update(kw)
    return RasterDataModule(**args)


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_unsupported_format(grid):
    text = grid["dir"] / "notes.txt"
    text.write_text("not a raster")
    with pytest.raises(RasterError, match=r"notes\.txt: not a raster GDAL can open") as err:
        _dm(grid, modalities={"a": str(text)})
    _one_line(err)


def test_truncated_raster(grid):
    data = grid["a"].read_bytes()
    broken = grid["dir"] / "truncated.tif"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(RasterError, match=r"truncated\.tif: (unreadable or corrupt raster|not a raster)") as err:
        read_raster(broken)
    _one_line(err)


def test_rotated_transform(grid):
    rotated = grid["dir"] / "rotated.tif"
    with rasterio.open(rotated, "w", driver="GTiff", height=8, width=8, count=1, dtype="float32", crs="EPSG:32632",
                       transform=Affine(10, 2, 500_000, 2, -10, 4_000_000)) as dst:
        dst.write(np.ones((1, 8, 8), np.float32))
    with pytest.raises(RasterError, match=r"rotated\.tif: rotated or sheared geotransform"):
        _dm(grid, modalities={"a": str(grid["a"]), "r": str(rotated)})


def test_label_grid_must_match_the_reference(grid):
    small = write_tif(grid["dir"] / "small.tif", np.ones((6, 8), np.uint8))
    with pytest.raises(RasterError, match=r"small\.tif: different extents|small\.tif.*do not match"):
        _dm(grid, train_labels=str(small))


def test_class_without_training_pixel_warns_or_refuses(grid):
    with pytest.warns(UserWarning, match=r"class 3 \(class 3\) has no training pixel"):
        test = np.zeros((8, 8), np.uint8)
        test[5, 5], test[7, 7], test[0, 6] = 1, 2, 3
        _dm(grid, test_labels=str(write_tif(grid["dir"] / "t3.tif", test)))
    with pytest.raises(RasterError, match=r"class 3 \(Water\) has no training pixel"):
        _dm(grid, class_names=["Grass", "Road", "Water"])


def test_empty_sets_and_shared_pixels(grid):
    empty = write_tif(grid["dir"] / "empty.tif", np.zeros((8, 8), np.uint8))
    with pytest.raises(RasterError, match=r"empty\.tif: the test set is empty"):
        _dm(grid, test_labels=str(empty), val_labels=str(grid["train"]))
    with pytest.raises(RasterError, match=r"train\.tif and .*train\.tif: 3 pixels are labelled in both train and test"):
        _dm(grid, test_labels=str(grid["train"]))


def test_nan_inf_pixels_are_masked_and_all_nodata_is_refused(grid):
    data = np.random.default_rng(1).normal(size=(2, 8, 8)).astype(np.float32)
    data[0, 1, 1], data[1, 3, 3] = np.nan, np.inf
    nan_path = write_tif(grid["dir"] / "nan.tif", data)
    dm = _dm(grid, modalities={"x": str(nan_path)})
    dm.setup("fit")
    assert not dm.scene.valid[1, 1] and not dm.scene.valid[3, 3]
    assert (1, 1) not in set(zip(dm.train_dataset.rows, dm.train_dataset.cols))  # labelled, but dropped
    assert np.isfinite(dm.scene.data["x"]).all()
    dead = write_tif(grid["dir"] / "dead.tif", np.full((1, 8, 8), -9999, np.float32), nodata=-9999)
    with pytest.raises(RasterError, match=r"dead\.tif: every pixel is nodata or NaN"):
        _dm(grid, modalities={"a": str(grid["a"]), "d": str(dead)}).setup("fit")


def test_too_large_or_even_patch(grid):
    from rsfusion.datamodules.errors import InputError

    with pytest.raises(InputError, match=r"patch_size 9 is larger than the scene \(8, 8\) of .*a\.tif") as err:
        _dm(grid, patch_size=9)
    _one_line(err)
    with pytest.raises(InputError, match=r"patch_size 9 is larger"):
        _dm(grid, patch_size=9, sampling="tile")
    with pytest.raises(InputError, match=r"patch_size 4 is even: .* use 5, or set allow_even_patch: true "
                                         r"\(pixel at index 1\)") as err:
        _dm(grid, patch_size=4)
    _one_line(err)
    assert _dm(grid, patch_size=4, allow_even_patch=True).patch_size == 4
    assert _dm(grid, patch_size=4, sampling="tile").patch_size == 4  # tiles have no centre pixel


def test_checkpoint_band_counts_must_match_the_data():
    from rsfusion.datamodules.errors import InputError
    from rsfusion.lightning_modules import TwoBranchCNN

    model = TwoBranchCNN(in_channels={"hsi": 48, "dsm": 1}, num_classes=6, width=4)
    with pytest.raises(InputError, match=r"^modality 'hsi': 48 channels, the checkpoint was trained on 30$"):
        model.on_load_checkpoint({"hyper_parameters": {"in_channels": {"hsi": 30, "dsm": 1}, "num_classes": 6}})
    with pytest.raises(InputError, match=r"^modality 'dsm': not a modality the checkpoint was trained on: hsi \(48 "
                                         r"channels\), lidar \(1 channels\); lidar missing \(renamed\?\)$"):
        model.on_load_checkpoint({"hyper_parameters": {"in_channels": {"hsi": 48, "lidar": 1}, "num_classes": 6}})
    with pytest.raises(InputError, match=r"^modalities are given in the order hsi, dsm; the checkpoint takes them in "
                                         r"the order dsm, hsi"):
        model.on_load_checkpoint({"hyper_parameters": {"in_channels": {"dsm": 1, "hsi": 48}, "num_classes": 6}})
    with pytest.raises(InputError, match=r"num_classes=7, the data gives 6"):
        model.on_load_checkpoint({"hyper_parameters": {"in_channels": {"hsi": 48, "dsm": 1}, "num_classes": 7}})
    model.on_load_checkpoint({"hyper_parameters": {"in_channels": {"hsi": 48, "dsm": 1}, "num_classes": 6}})


def test_evaluation_set_smaller_than_the_process_count_is_refused(grid):
    from types import SimpleNamespace

    from rsfusion.datamodules.errors import InputError

    dm = _dm(grid)
    dm.setup("test")
    dm.trainer = SimpleNamespace(world_size=4, global_rank=1)
    with pytest.raises(InputError, match=r"a\.tif: an evaluation set has 3 samples, fewer than the 4 processes"):
        dm.test_dataloader()
    dm.trainer = SimpleNamespace(world_size=3, global_rank=1)
    assert [len(batch["label"]) for batch in dm.test_dataloader()] == [1]  # one each, none repeated
