"""Windowed full-scene prediction: windows reproduce the in-memory scene; statistics stream exactly."""
from __future__ import annotations

import numpy as np
import pytest

from rsfusion.datamodules import RasterDataModule
from rsfusion.datamodules.errors import InputError
from rsfusion.datamodules.normalization import fit_normalizers
from rsfusion.datamodules.scene import load_scene
from rsfusion.datamodules.tiling import grid_windows
from rsfusion.datamodules.windows import SceneSource, WindowedPredictDataset
from tests.conftest import write_tif

H, W = 23, 29


@pytest.fixture()
def scene_files(tmp_path):
    """HSI-like bands with a nodata corner, a PAN-like band at 2x, and train/test label maps."""
    rng = np.random.default_rng(0)
    hsi = rng.normal(100.0, 20.0, size=(6, H, W)).astype(np.float32)
    hsi[:, :3, :4] = -9999.0
    pan = rng.normal(size=(1, 2 * H, 2 * W)).astype(np.float32) * np.arange(1, 2 * W + 1, dtype=np.float32)
    labels = rng.integers(1, 4, size=(H, W))
    split = rng.random((H, W)) < 0.5
    return {
        "hsi": str(write_tif(tmp_path / "hsi.tif", hsi, nodata=-9999.0)),
        "pan": str(write_tif(tmp_path / "pan.tif", pan, res=5.0)),
        "train": str(write_tif(tmp_path / "train.tif", np.where(split, labels, 0).astype(np.uint8))),
        "test": str(write_tif(tmp_path / "test.tif", np.where(split, 0, labels).astype(np.uint8))),
    }


def _source(files, pad_mode="reflect") -> SceneSource:
    return SceneSource({"hsi": files["hsi"], "pan": files["pan"]}, {"hsi": 1, "pan": 2}, (H, W), {}, pad_mode)


@pytest.mark.parametrize("pad_mode", ["reflect", "zero"])
@pytest.mark.parametrize("core", [(0, 7, 0, 9), (8, 23, 10, 29), (5, 6, 20, 21), (0, 23, 0, 29), (2, 20, 0, 29)])
def test_a_window_equals_the_same_part_of_the_whole_padded_scene(scene_files, core, pad_mode):
    pad = 5
    whole = load_scene({"hsi": scene_files["hsi"], "pan": scene_files["pan"]}, pad=pad, pad_mode=pad_mode)
    window = _source(scene_files, pad_mode).scene(core, pad, whole.normalizers)
    assert window.pad_mode == pad_mode
    r0, r1, c0, c1 = core
    for name, r in (("hsi", 1), ("pan", 2)):
        expected = whole.data[name][:, r0 * r:(r1 + 2 * pad) * r, c0 * r:(c1 + 2 * pad) * r]
        np.testing.assert_array_equal(window.data[name], expected)
    np.testing.assert_array_equal(window.valid, whole.valid[r0:r1, c0:c1])
    assert not window.valid.all() or r0 >= 3 or c0 >= 4  # the nodata corner is seen as invalid


@pytest.mark.parametrize("options", [
    dict(normalization="zscore"),
    dict(normalization="minmax", clip_percentile=2.0),
    dict(normalization="minmax_global"),
    dict(normalization="zscore", pca={"hsi": 3}),
    dict(normalization="zscore", train_only=True),
    dict(normalization="zscore", clip_percentile=5.0, seed=7, max_samples=150),
])
def test_streaming_statistics_equal_the_in_memory_fit(scene_files, options, monkeypatch):
    """One fit (rsfusion.datamodules.normalization.fit_normalizers) fed the whole scene or 7x7 windows."""
    options = dict(options)
    train_only = options.pop("train_only", False)
    if "max_samples" in options:  # percentiles from a sample of ~150 of the 667 HSI pixels, the same pixels both ways
        monkeypatch.setattr("rsfusion.datamodules.normalization.MAX_PERCENTILE_SAMPLES", options.pop("max_samples"))
    fit_mask = None
    if train_only:
        import rasterio

        with rasterio.open(scene_files["train"]) as src:
            fit_mask = src.read(1) > 0
    paths = {"hsi": scene_files["hsi"], "pan": scene_files["pan"]}
    whole = load_scene(paths, pad=1, fit_mask=fit_mask, **options)
    modes = {name: options["normalization"] for name in paths}
    source = _source(scene_files)
    streamed = fit_normalizers(source.read, grid_windows((H, W), 7), (H, W), source.ratios, paths, modes,
                               options.get("clip_percentile"), fit_mask, options.get("pca"), options.get("seed", 0))
    for name in paths:
        got, want = streamed[name].state(), whole.normalizers[name].state()
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=2e-5, err_msg=f"{name}.{key}")


def test_zero_padding_is_zero_beyond_the_edge_in_normalised_units_and_keeps_the_nodata_fill(scene_files):
    paths = {"hsi": scene_files["hsi"], "pan": scene_files["pan"]}
    pad = 4
    zero = load_scene(paths, pad=pad, pad_mode="zero", normalization="minmax")
    reflect = load_scene(paths, pad=pad, normalization="minmax")
    for name, r in (("hsi", 1), ("pan", 2)):
        p = pad * r
        inner = reflect.data[name][:, p:-p, p:-p]
        np.testing.assert_array_equal(zero.data[name][:, p:-p, p:-p], inner)  # the same normalised image
        np.testing.assert_array_equal(reflect.data[name], np.pad(inner, ((0, 0), (p, p), (p, p)), mode="reflect"))
        border = np.ones(zero.data[name].shape[1:], dtype=bool)
        border[p:-p, p:-p] = False
        assert (zero.data[name][:, border] == 0).all()  # 0 = the band minimum under minmax, as the authors pad
    # the nodata corner (rows :3, cols :4) holds the fill value (the mean), not zero, in both modes
    fill = zero.normalizers["hsi"].fill
    assert (fill > 0.2).all()
    np.testing.assert_array_equal(zero.data["hsi"][:, pad:pad + 3, pad:pad + 4],
                                  np.broadcast_to(fill[:, None, None], (6, 3, 4)))
    # feature-bank style modalities added later are padded the same way
    cube = np.arange(2 * H * W, dtype=np.float32).reshape(2, H, W) + 1
    zero.add("bank", cube)
    reflect.add("bank", cube)
    assert (zero.data["bank"][:, :pad] == 0).all() and (zero.data["bank"][:, :, -pad:] == 0).all()
    np.testing.assert_array_equal(zero.data["bank"][:, pad:-pad, pad:-pad], cube)
    np.testing.assert_array_equal(reflect.data["bank"][:, pad - 1, pad:-pad], cube[:, 1])


def test_a_tile_at_the_scene_corner_sees_zeros_beyond_the_edge(scene_files):
    """The authors' first training tile starts at -tile/2: with pad_mode zero its outer half is zero."""
    common = dict(modalities={"hsi": scene_files["hsi"], "pan": scene_files["pan"]}, train_labels=scene_files["train"],
                  test_labels=scene_files["test"], sampling="tile", patch_size=8, train_stride=4, split_block_size=4,
                  normalization="minmax")
    dm = RasterDataModule(**common, pad_mode="zero")
    dm.setup("fit")
    origins = dm.train_dataset.origins
    first = int(np.flatnonzero((origins == [-4, -4]).all(axis=1))[0])
    tile = dm.train_dataset[first]
    assert (tile["hsi"][:, :4, :].numpy() == 0).all() and (tile["hsi"][:, :, :4].numpy() == 0).all()
    assert (tile["pan"][:, :8, :].numpy() == 0).all() and (tile["pan"][:, :, :8].numpy() == 0).all()
    np.testing.assert_array_equal(tile["hsi"][:, 4:, 4:].numpy(), dm.scene.data["hsi"][:, 8:12, 8:12])
    assert (tile["label"][:4].numpy() == -1).all()  # nothing beyond the edge is labelled


def test_pad_mode_is_checked(scene_files):
    with pytest.raises(InputError, match="pad_mode must be reflect or zero, got 'edge'"):
        RasterDataModule({"hsi": scene_files["hsi"]}, train_labels=scene_files["train"],
                         test_labels=scene_files["test"], pad_mode="edge")


def test_pca_axes_have_a_fixed_sign(scene_files):
    whole = load_scene({"hsi": scene_files["hsi"]}, pad=1, pca={"hsi": 3})
    axes = whole.normalizers["hsi"].pca[1]
    peaks = axes[np.arange(3), np.abs(axes).argmax(axis=1)]
    assert (peaks > 0).all()


def _all_samples(dataset) -> dict:
    batch = dataset.__getitems__(np.arange(len(dataset)))
    key = "index" if "index" in batch else "origin"
    out = {}
    for i, where in enumerate(batch[key].numpy()):
        out[tuple(where)] = {k: v[i].numpy() for k, v in batch.items() if k != key}
    return out


@pytest.mark.parametrize("pad_mode", ["reflect", "zero"])
@pytest.mark.parametrize("sampling,patch,window", [("pixel", 5, 7), ("pixel", 5, 100), ("tile", 8, 8),
                                                   ("tile", 8, 13), ("tile", 8, 5), ("tile", 16, 13)])
def test_windowed_prediction_samples_equal_the_in_memory_ones(scene_files, sampling, patch, window, pad_mode):
    common = dict(modalities={"hsi": scene_files["hsi"], "pan": scene_files["pan"]},
                  train_labels=scene_files["train"], test_labels=scene_files["test"], sampling=sampling,
                  patch_size=patch, split_block_size=4, pad_mode=pad_mode)
    in_memory = RasterDataModule(**common)
    in_memory.setup("predict")
    windowed = RasterDataModule(**common, predict_window=window)
    windowed.setup("predict")
    assert windowed.scene is None  # nothing read whole
    windowed.predict_dataloader()
    assert isinstance(windowed.predict_dataset, WindowedPredictDataset)
    want, got = _all_samples(in_memory.predict_dataset), _all_samples(windowed.predict_dataset)
    assert got.keys() == want.keys()
    for where, sample in want.items():
        for key, value in sample.items():
            np.testing.assert_allclose(got[where][key], value, rtol=1e-4, atol=1e-4, err_msg=f"{where} {key}")
    if sampling == "pixel":
        assert len(got) == int(in_memory.scene.valid.sum())  # every valid pixel once, nodata never


def test_windowed_batches_keep_the_asked_order(scene_files):
    dm = RasterDataModule({"hsi": scene_files["hsi"]}, train_labels=scene_files["train"],
                          test_labels=scene_files["test"], patch_size=3, split_block_size=4, predict_window=6)
    dm.setup("predict")
    dataset = dm.predict_dataloader().dataset
    order = np.random.default_rng(0).permutation(len(dataset))[:50]
    batch = dataset.__getitems__(order)
    for i, j in enumerate(order):
        np.testing.assert_array_equal(batch["index"][i].numpy(), dataset[int(j)]["index"].numpy())
        np.testing.assert_array_equal(batch["hsi"][i].numpy(), dataset[int(j)]["hsi"].numpy())


def test_a_window_size_below_one_is_refused(scene_files):
    with pytest.raises(InputError, match="predict_window must be a positive number of pixels, got 0"):
        RasterDataModule({"hsi": scene_files["hsi"]}, train_labels=scene_files["train"],
                         test_labels=scene_files["test"], predict_window=0)


def test_checkpoint_statistics_drive_windowed_prediction_and_flag_another_scene(scene_files, tmp_path):
    common = dict(modalities={"hsi": scene_files["hsi"]}, train_labels=scene_files["train"],
                  test_labels=scene_files["test"], patch_size=3, split_block_size=4)
    trained = RasterDataModule(**common)
    trained.setup("fit")
    state = trained.state_dict()
    assert set(state["normalizers"]["hsi"]) == {"offset", "scale", "lo", "hi", "fill"}

    windowed = RasterDataModule(**common, predict_window=8)
    windowed.load_state_dict(state)
    windowed.setup("predict")
    assert windowed.predict_dataloader().dataset.normalizers["hsi"] is windowed.normalizers["hsi"]
    np.testing.assert_array_equal(windowed.normalizers["hsi"].stats.offset,
                                  trained.scene.normalizers["hsi"].stats.offset)

    shifted = dict(state["normalizers"]["hsi"])
    shifted["offset"] = shifted["offset"] + 1.0
    with pytest.warns(UserWarning, match="normalisation statistics differ from the checkpoint's"):
        trained.load_state_dict({"normalizers": {"hsi": shifted}})
