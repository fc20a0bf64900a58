"""What RasterDataModule reads when: headers and label maps at construction, scene pixels in setup."""
from __future__ import annotations

import numpy as np
import pytest

from rsfusion.datamodules import RasterDataModule
from tests.conftest import CONFIGS, write_tif


class PixelsRead(AssertionError):
    """Raised by the stubbed raster readers: pixels were read where only headers should be."""


def _refuse(*args, **kwargs):
    raise PixelsRead(f"scene pixels read: {args[:1]}")


def test_construction_reads_headers_and_labels_only_and_setup_reads_the_scene(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    hsi = write_tif(tmp_path / "hsi.tif", rng.normal(size=(5, 30, 36)).astype(np.float32))
    pan = write_tif(tmp_path / "pan.tif", rng.normal(size=(1, 60, 72)).astype(np.float32), res=5.0)
    labels = write_tif(tmp_path / "labels.tif", rng.integers(0, 4, size=(30, 36)).astype(np.uint8))
    monkeypatch.setattr("rsfusion.datamodules.scene.read_raster", _refuse)
    monkeypatch.setattr("rsfusion.datamodules.windows.read_raster", _refuse)
    dm = RasterDataModule({"hsi": str(hsi), "pan": str(pan)}, labels=str(labels), train_per_class=10, patch_size=5,
                          pca={"hsi": 3}, class_names=["a", "b", "c"])
    # everything the CLI links into the model, and the splits with their checks, without a pixel
    assert dm.in_channels == {"hsi": 3, "pan": 1} and dm.num_classes == 3 and dm.class_names == ["a", "b", "c"]
    assert dm.dense is False and dm.patch_size == 5 and dm.has_validation
    train = dm.label_rasters["train"] + dm.label_rasters["val"]
    assert np.bincount(train.ravel(), minlength=4)[1:].tolist() == [10, 10, 10]
    assert dm.scene is None and dm.normalizers is None
    with pytest.raises(PixelsRead):
        dm.setup("fit")
    monkeypatch.undo()
    dm.setup("fit")
    assert dm.scene.data["hsi"].shape == (3, 40, 46) and dm.scene.data["pan"].shape == (1, 80, 92)
    assert len(dm.train_dataset) == int((dm.label_rasters["train"] > 0).sum())
    assert dm.leakage >= 0


def test_print_config_builds_nothing(tmp_path, monkeypatch, capsys):
    from rsfusion.lightning_modules.commands.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("rsfusion.datamodules.raster.read_header", _refuse)
    monkeypatch.setattr("rsfusion.datamodules.synthetic.ensure_scene", _refuse)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(CONFIGS / "demo.yaml"), "--data.init_args.root", str(tmp_path / "scene"),
              "--print_config"])
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: rsfusion.datamodules.SyntheticDataModule" in printed
    assert f"root: {tmp_path / 'scene'}" in printed
    assert not (tmp_path / "scene").exists() and not (tmp_path / "runs").exists()
