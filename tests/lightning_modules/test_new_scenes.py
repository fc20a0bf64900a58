"""Mapping a new, unlabelled scene from a checkpoint through the console script, and what a map carries:
probability and confidence rasters, Cloud-Optimised GeoTIFFs, the legend QGIS shows."""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from rsfusion.datamodules.synthetic import HSI_CLASSES, ensure_scene
from rsfusion.lightning_modules.commands.cli import main
from tests.conftest import CONFIGS, tiny_config

DATA = dict(scene_height=32, scene_width=40, train_per_class=12, patch_size=5, batch_size=32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint trained on scene A (seed 0), and scene B (seed 1, another size), unlabelled for the CLI."""
    tmp = tmp_path_factory.mktemp("new_scenes")
    config = tiny_config(tmp, "demo", DATA, dict(width=8), max_epochs=2)
    main(["fit", "--config", str(config), "--test_after_fit", "false", "--map_after_fit", "false",
          "--trainer.enable_model_summary", "false"])
    ckpt = next((tmp / "runs" / "version_0" / "checkpoints").glob("best-*.ckpt"))
    scene_b = ensure_scene(tmp / "scene", "hsi_dsm", seed=1, height=36, width=44, train_per_class=12)
    return tmp, config, ckpt, scene_b


def _predict(tmp: Path, out: str, *args: str) -> Path:
    main(["predict", *args, "--trainer.default_root_dir", str(tmp / out), "--trainer.enable_progress_bar", "false",
          "--trainer.logger", "false", "--map.output_dir", str(tmp / out / "maps")])
    return tmp / out / "maps"


def _modalities(**paths) -> str:
    return "{modalities: {" + ", ".join(f"{name}: {path}" for name, path in paths.items()) + "}}"


def _read(path: Path, band: int | None = 1) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(band) if band else src.read()


def test_an_unlabelled_scene_is_mapped_with_everything_else_from_the_checkpoint(trained, caplog):
    tmp, config, ckpt, b = trained
    # only the rasters, given in another order than the model takes them
    out = _predict(tmp, "only_rasters", "--ckpt_path", str(ckpt), "--data", _modalities(dsm=b["dsm"], hsi=b["hsi"]))
    classes = _read(out / "classification_map.tif")
    with rasterio.open(out / "classification_map.tif") as src, rasterio.open(b["hsi"]) as hsi:
        assert src.shape == hsi.shape == (36, 44)  # scene B's grid, not the training scene's 32 x 40
        assert src.crs == hsi.crs and src.transform == hsi.transform
        assert src.colormap(1)[3][:3] == (255, 225, 25)  # the checkpoint's palette
    assert classes.min() >= 1 and classes.max() <= len(HSI_CLASSES)
    assert sorted(p.name for p in out.iterdir()) == [  # defaults: no extra rasters, nothing left behind
        "classification_map.manifest.json", "classification_map.png", "classification_map.tif",
        "classification_map.tif.aux.xml"]

    # the same scene through the training config in full (SyntheticDataModule, another scene seed, with labels)
    full = _predict(tmp, "full_config", "--config", str(config), "--ckpt_path", str(ckpt),
                    "--data.init_args.scene_seed", "1", "--data.init_args.scene_height", "36",
                    "--data.init_args.scene_width", "44")
    np.testing.assert_array_equal(_read(full / "classification_map.tif"), classes)

    # read window by window: the same map
    windowed = _predict(tmp, "windowed", "--ckpt_path", str(ckpt), "--data", _modalities(hsi=b["hsi"], dsm=b["dsm"]),
                        "--data.init_args.predict_window", "16")
    np.testing.assert_array_equal(_read(windowed / "classification_map.tif"), classes)


def test_the_data_options_come_from_the_checkpoint_and_the_user_wins(trained, capsys):
    tmp, _, ckpt, b = trained
    from rsfusion.lightning_modules.commands.cli import RSFusionCLI, cli_kwargs

    class Parsed(Exception):
        """Stops the CLI once the arguments are parsed."""

    class Probe(RSFusionCLI):
        def before_instantiate_classes(self):
            super().before_instantiate_classes()
            raise Parsed(self.config["predict"]["data"])

    with pytest.raises(Parsed) as parsed:
        Probe(**cli_kwargs(), args=["predict", "--ckpt_path", str(ckpt), "--data", _modalities(dsm=b["dsm"],
                                                                                               hsi=b["hsi"]),
                                    "--data.init_args.batch_size", "7"])
    data = parsed.value.args[0]
    assert data["class_path"] == "rsfusion.datamodules.RasterDataModule"
    init = data["init_args"]
    assert list(init["modalities"]) == ["hsi", "dsm"]  # put in the checkpoint's order
    assert init["patch_size"] == 5 and init["sampling"] == "pixel" and init["class_names"] == HSI_CLASSES
    assert init["eval_batch_size"] == 128 and init["batch_size"] == 7  # the given option wins
    assert init["train_labels"] is None and init["test_labels"] is None


def _error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err
    return lines[0]


def test_modalities_that_do_not_fit_the_checkpoint_are_one_line_errors(trained, capsys, tmp_path):
    tmp, config, ckpt, b = trained
    predict = ["predict", "--ckpt_path", str(ckpt), "--trainer.logger", "false", "--data"]
    line = _error(capsys, *predict, _modalities(hsi=b["hsi"]))
    assert line.startswith("error: modality 'dsm' is missing: the checkpoint ") and \
        line.endswith("was trained on hsi (48 bands), dsm (1 bands), the data gives hsi")
    line = _error(capsys, *predict, _modalities(hsi=b["hsi"], lidar=b["dsm"]))
    assert line.startswith(f"error: {b['dsm']} (modality 'lidar'): not a modality the checkpoint ")
    assert line.endswith("; dsm missing (renamed?)")
    line = _error(capsys, *predict, _modalities(hsi=b["hsi"], dsm=b["dsm"], sar=b["dsm"]))
    assert line.startswith(f"error: {b['dsm']} (modality 'sar'): not a modality the checkpoint ")
    with rasterio.open(b["hsi"]) as src:
        profile, data = src.profile, src.read()
    profile.update(count=47)
    fewer = tmp_path / "hsi47.tif"
    with rasterio.open(fewer, "w", **profile) as dst:
        dst.write(data[:47])
    line = _error(capsys, *predict, _modalities(hsi=fewer, dsm=b["dsm"]))
    assert line.startswith(f"error: {fewer} (modality 'hsi'): 47 bands, the checkpoint ") and line.endswith(
        "was trained on 48")

    # without labels a scene can be predicted, not trained on or tested
    unlabelled = "{class_path: RasterDataModule, init_args: {" + _modalities(hsi=b["hsi"], dsm=b["dsm"])[
        1:-1] + ", class_names: [a, b]}}"
    line = _error(capsys, "fit", "--config", str(config), "--data", unlabelled, "--trainer.logger", "false")
    assert line == f"error: fit needs label maps: give train_labels and test_labels (or labels); {b['hsi']}, " \
                   f"{b['dsm']} without labels can only be predicted"


def _category_names(path: Path) -> list[str] | None:
    """Band 1's category names as GDAL itself reads them (what QGIS labels a paletted legend with)."""
    libs = glob.glob(os.path.join(os.path.dirname(os.path.dirname(rasterio.__file__)), "rasterio.libs", "libgdal*"))
    name = libs[0] if libs else ctypes.util.find_library("gdal")
    if name is None:
        return None
    gdal = ctypes.CDLL(name)
    gdal.GDALAllRegister()
    gdal.GDALOpen.restype, gdal.GDALOpen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]
    gdal.GDALGetRasterBand.restype, gdal.GDALGetRasterBand.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int]
    gdal.GDALGetRasterCategoryNames.restype = ctypes.POINTER(ctypes.c_char_p)
    gdal.GDALGetRasterCategoryNames.argtypes = [ctypes.c_void_p]
    gdal.GDALClose.argtypes = [ctypes.c_void_p]
    gdal.CPLSetThreadLocalConfigOption.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    # as QGIS opens it: GDAL looks for the .aux.xml sidecar (the CLI's EMPTY_DIR setting would hide it)
    gdal.CPLSetThreadLocalConfigOption(b"GDAL_DISABLE_READDIR_ON_OPEN", b"FALSE")
    gdal.GDALGetRasterColorTable.restype, gdal.GDALGetRasterColorTable.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    dataset = gdal.GDALOpen(str(path.resolve()).encode(), 0)
    band = gdal.GDALGetRasterBand(dataset, 1)
    assert gdal.GDALGetRasterColorTable(band)  # QGIS's order: the colour table, then each entry's label
    names = gdal.GDALGetRasterCategoryNames(band)
    out = []
    while names and names[len(out)]:
        out.append(names[len(out)].decode())
    gdal.GDALClose(dataset)
    gdal.CPLSetThreadLocalConfigOption(b"GDAL_DISABLE_READDIR_ON_OPEN", None)
    return out


def _independent_confidence(probs: np.ndarray) -> np.ndarray:
    ranked = np.sort(probs, axis=0)[::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(probs > 0, probs * np.log(probs), 0).sum(axis=0) / np.log(probs.shape[0])
    return np.stack([ranked[0], ranked[0] - ranked[1], entropy])


@pytest.mark.slow
def test_probability_and_confidence_rasters_as_cloud_optimised_geotiffs(trained):
    tmp, _, ckpt, _ = trained
    c = ensure_scene(tmp / "scene", "hsi_dsm", seed=2, height=264, width=300, train_per_class=12)
    modalities = _modalities(hsi=c["hsi"], dsm=c["dsm"])
    out = _predict(tmp, "cog", "--ckpt_path", str(ckpt), "--data", modalities, "--map.probabilities", "float16",
                   "--map.confidence", "[max, margin, entropy]", "--map.cog", "true")
    with rasterio.open(c["hsi"]) as hsi:
        crs, transform = hsi.crs, hsi.transform
    with rasterio.open(out / "classification_map.tif") as src:
        assert src.crs == crs and src.transform == transform and src.shape == (264, 300)
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and src.profile["tiled"]
        assert src.overviews(1) == [2]  # down to one 256-pixel tile
        assert src.dtypes[0] == "uint8" and src.nodata == 0
        assert src.colormap(1)[1][:3] == (230, 25, 75) and src.colormap(1)[6][:3] == (145, 30, 180)
        classes = src.read(1)
        # nearest overview: only class values, never averages of them
        assert set(np.unique(src.read(1, out_shape=(132, 150)))) <= set(range(0, 7))
    names = _category_names(out / "classification_map.tif")
    if names is not None:
        assert names == ["no data", *HSI_CLASSES]

    with rasterio.open(out / "classification_map_probabilities.tif") as src:
        assert src.count == 6 and src.descriptions == tuple(HSI_CLASSES)
        assert src.dtypes[0] == "float32" and src.tags(1, ns="IMAGE_STRUCTURE")["NBITS"] == "16"  # half floats
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and src.overviews(1) == [2]
        assert src.crs == crs and src.transform == transform
        probs = src.read()
    np.testing.assert_allclose(probs.sum(axis=0), 1, atol=4e-3)
    top = probs.argmax(axis=0) + 1
    # the class map is the argmax; where half-float rounding ties the top two, either is the argmax
    ties = probs.max(axis=0) - np.take_along_axis(probs, classes[None].astype(np.int64) - 1, 0)[0]
    assert np.all((top == classes) | (ties <= 1e-3)) and (top == classes).mean() > 0.99

    with rasterio.open(out / "classification_map_confidence.tif") as src:
        assert src.count == 3 and src.descriptions == (
            "max probability", "margin (top1 - top2 probability)", "normalised entropy (0 = certain, 1 = uniform)")
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and src.transform == transform
        confidence = src.read()
    np.testing.assert_allclose(confidence, _independent_confidence(probs), atol=3e-3)
    assert confidence[0].min() >= 1 / 6 - 1e-3 and 0 <= confidence[2].min() and confidence[2].max() <= 1

    # uint8 probabilities, plain GeoTIFF, read window by window: the same map, the same probabilities to 1/255
    plain = _predict(tmp, "uint8", "--ckpt_path", str(ckpt), "--data", modalities, "--map.probabilities", "uint8",
                     "--map.confidence", "margin", "--data.init_args.predict_window", "100")
    np.testing.assert_array_equal(_read(plain / "classification_map.tif"), classes)
    with rasterio.open(plain / "classification_map_probabilities.tif") as src:
        assert src.dtypes[0] == "uint8" and src.scales == (1 / 255,) * 6 and src.descriptions == tuple(HSI_CLASSES)
        assert src.overviews(1) == [] and "LAYOUT" not in src.tags(ns="IMAGE_STRUCTURE")
        scaled = src.read().astype(np.float32)
    assert np.abs(scaled / 255 - probs).max() <= 0.5 / 255 + 1e-3
    margin = _read(plain / "classification_map_confidence.tif", None)
    assert margin.shape == (1, 264, 300)
    np.testing.assert_allclose(margin[0], _independent_confidence(probs)[1], atol=3e-3)


@pytest.mark.slow
def test_probability_maps_under_ddp_equal_one_process(trained):
    tmp, _, ckpt, b = trained
    script = Path(sys.executable).parent / "lightning"
    if not script.exists():
        pytest.skip("console script 'lightning' not installed (pip install -e .)")
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    maps = {}
    for label, extra in (("one", []), ("ddp", ["--trainer.strategy", "ddp", "--trainer.devices", "2",
                                               "--trainer.accelerator", "cpu"])):
        out = tmp / f"ddp_{label}"
        run = subprocess.run([str(script), "predict", "--ckpt_path", str(ckpt), "--data",
                              _modalities(hsi=b["hsi"], dsm=b["dsm"]), "--map.probabilities", "float16",
                              "--map.confidence", "[max, entropy]", "--map.output_dir", str(out),
                              "--trainer.default_root_dir", str(out), "--trainer.logger", "false", *extra],
                             cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        maps[label] = [_read(out / f"classification_map{suffix}.tif", None)
                       for suffix in ("", "_probabilities", "_confidence")]
    for one, ddp in zip(maps["one"], maps["ddp"]):
        np.testing.assert_array_equal(one, ddp)
    assert maps["ddp"][1].shape == (6, 36, 44) and not list((tmp / "ddp_ddp").glob(".*parts"))


def test_the_shipped_predict_config_maps_the_readme_scene(trained, tmp_path, monkeypatch):
    """configs/predict/new_scene.yaml, as docs/maps.md runs it from a checkout after ``fit --config demo.yaml``."""
    import shutil

    from rsfusion.datamodules import make_scene

    _, _, ckpt, _ = trained
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo" / "version_0" / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt, tmp_path / "runs" / "demo" / "version_0" / "checkpoints" / "last.ckpt")
    scene = make_scene.main(["--seed", "1", "--height", "100", "--width", "140"])
    main(["predict", "--config", str(CONFIGS / "predict" / "new_scene.yaml"),
          "--trainer.enable_progress_bar", "false"])
    maps = tmp_path / "runs" / "scene_b" / "version_0" / "predictions"
    with rasterio.open(maps / "classification_map.tif") as src, rasterio.open(scene["hsi"]) as hsi:
        assert src.shape == (100, 140) and src.transform == hsi.transform and src.crs == hsi.crs
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
    with rasterio.open(maps / "classification_map_confidence.tif") as src:
        assert src.descriptions == ("max probability", "margin (top1 - top2 probability)")
    with rasterio.open(maps / "classification_map_probabilities.tif") as src:
        assert src.count == 6 and src.descriptions == tuple(HSI_CLASSES)
