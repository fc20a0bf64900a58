"""Training-batch augmentation: flips/rotations keep every modality and the labels aligned, noise has
the asked statistics, nothing changes when it is off, and a resumed run draws the same augmentations."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from rsfusion.datamodules import RasterDataModule
from rsfusion.datamodules.augment import BatchAugmenter, batch_generator, dihedral
from rsfusion.datamodules.errors import InputError
from tests.conftest import tiny_config, write_tif

H, W, R = 32, 40, 4  # PAN at 4x


def np_dihedral(x: np.ndarray, code: int) -> np.ndarray:
    y = np.rot90(x, code % 4, axes=(-2, -1))
    return np.flip(y, -1) if code >= 4 else y


def label_of(rows, cols):
    return (rows * 7 + cols * 3) % 5 + 1


@pytest.fixture(scope="module")
def coordinate_scene(tmp_path_factory) -> dict[str, str]:
    """Every pixel holds its own coordinates: HSI (row+1, col+1); PAN at 4x (the coarse row+1, col+1 of
    each fine pixel, and its position inside the 4x4 block); labels a function of the coordinates."""
    folder = tmp_path_factory.mktemp("coords")
    rows, cols = np.mgrid[:H, :W]
    hsi = np.stack([rows + 1, cols + 1]).astype(np.float32)
    fr, fc = np.mgrid[:H * R, :W * R]
    pan = np.stack([fr // R + 1, fc // R + 1, fr % R, fc % R]).astype(np.float32)
    labels = label_of(rows, cols)
    return {"hsi": str(write_tif(folder / "hsi.tif", hsi, res=4.0 * R)),
            "pan": str(write_tif(folder / "pan.tif", pan, res=4.0)),
            "train": str(write_tif(folder / "train.tif", np.where(cols < 20, labels, 0).astype(np.uint8), res=4.0 * R)),
            "test": str(write_tif(folder / "test.tif", np.where(cols >= 24, labels, 0).astype(np.uint8), res=4.0 * R))}


def _datamodule(files, **options) -> RasterDataModule:
    # normalization none + zero padding: a value of 0 means "beyond the scene edge" in every modality
    common = dict(modalities={"hsi": files["hsi"], "pan": files["pan"]}, train_labels=files["train"],
                  test_labels=files["test"], split_block_size=4, normalization="none", pad_mode="zero",
                  batch_size=64)
    return RasterDataModule(**{**common, **options})


class Recorder(L.LightningModule):
    """Keeps a copy of every batch the training and validation steps receive."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.train_batches, self.val_batches = [], []

    def training_step(self, batch, batch_idx):
        self.train_batches.append((self.current_epoch, batch_idx, {k: v.clone() for k, v in batch.items()}))
        return (self.weight - 1) ** 2

    def validation_step(self, batch, batch_idx):
        self.val_batches.append({k: v.clone() for k, v in batch.items()})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(dm, epochs: int, model: Recorder | None = None, **trainer) -> Recorder:
    L.seed_everything(0)
    model = model or Recorder()
    options = dict(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    L.Trainer(**{**options, **trainer}).fit(model, datamodule=dm)
    return model


def _samples(model: Recorder):
    for epoch, _, batch in model.train_batches:
        for i in range(len(next(iter(batch.values())))):
            yield epoch, {k: v[i].numpy() for k, v in batch.items()}


def _code(raw: np.ndarray, augmented: np.ndarray) -> int:
    codes = [c for c in range(8) if np.array_equal(np_dihedral(raw, c), augmented)]
    assert len(codes) == 1, codes
    return codes[0]


def test_the_eight_codes_are_numpy_rot90_and_flips():
    x = torch.randn(8, 3, 5, 5)
    labels = torch.randint(-1, 4, (8, 6, 6))
    codes = torch.arange(8)
    for value in (x, labels):
        out = dihedral(value, codes)
        for c in range(8):
            np.testing.assert_array_equal(out[c].numpy(), np_dihedral(value[c].numpy(), c))
    with pytest.raises(ValueError, match="square patches"):
        dihedral(torch.zeros(2, 1, 4, 5), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("options,expected", [
    (dict(flip=True, rotate=True), set(range(8))),
    (dict(rotate=True), {0, 1, 2, 3}),
    # flips alone: identity, both flips (= 180 degrees), left-right (4) and up-down (6 = rot180 then left-right)
    (dict(flip=True), {0, 2, 4, 6}),
])
def test_each_option_reaches_exactly_its_transforms_uniformly(options, expected):
    augmenter = BatchAugmenter(options, ["hsi"])
    codes = augmenter.draw_codes(8000, torch.Generator().manual_seed(0)).numpy()
    counts = np.bincount(codes, minlength=8)
    assert set(np.flatnonzero(counts)) == expected
    n, p = len(codes), 1 / len(expected)
    bound = 5 * np.sqrt(n * p * (1 - p))
    assert all(abs(counts[c] - n * p) < bound for c in expected), counts
    x = np.arange(16.0).reshape(4, 4)
    if options == dict(flip=True):
        assert np.array_equal(np_dihedral(x, 4), np.fliplr(x)) and np.array_equal(np_dihedral(x, 6), np.flipud(x))
        assert np.array_equal(np_dihedral(x, 2), np.flipud(np.fliplr(x)))


def test_tiles_of_every_modality_and_their_labels_stay_aligned(coordinate_scene):
    options = dict(sampling="tile", patch_size=8, train_stride=2)
    raw = _fit(_datamodule(coordinate_scene, **options), 1)
    augmented = _fit(_datamodule(coordinate_scene, augment={"flip": True, "rotate": True}, **options), 1)
    seen = []
    for (_, want), (_, got) in zip(_samples(raw), _samples(augmented), strict=True):
        code = _code(want["hsi"], got["hsi"])  # the sampler order is the same: find the transform drawn
        seen.append(code)
        np.testing.assert_array_equal(got["pan"], np_dihedral(want["pan"], code))
        np.testing.assert_array_equal(got["label"], np_dihedral(want["label"], code))
        # pixel for pixel: every PAN pixel lies in the HSI pixel it sits on (0 = beyond the edge) ...
        coarse = got["hsi"].repeat(R, axis=1).repeat(R, axis=2)
        np.testing.assert_array_equal(got["pan"][:2], coarse)
        # ... and every labelled pixel carries the label of the coordinates it shows
        labelled = got["label"] >= 0
        rows, cols = got["hsi"][0][labelled] - 1, got["hsi"][1][labelled] - 1
        np.testing.assert_array_equal(got["label"][labelled] + 1, label_of(rows, cols))
    assert set(seen) == set(range(8))


def test_even_pixel_patches_turn_about_their_pixel_in_every_modality(coordinate_scene):
    p = 4  # the pixel sits at index (p-1)//2 = 1
    options = dict(sampling="pixel", patch_size=p, allow_even_patch=True)
    raw = _fit(_datamodule(coordinate_scene, **options), 1)
    dm = _datamodule(coordinate_scene, augment={"flip": True, "rotate": True}, **options)
    augmented = _fit(dm, 1)
    scene, pad, c = dm.scene.data, dm.scene.pad, (p - 1) // 2
    seen = []
    for (_, want), (_, got) in zip(_samples(raw), _samples(augmented), strict=True):
        row, col = (want["hsi"][:, c, c] - 1).astype(int)
        np.testing.assert_array_equal(got["hsi"][:, c, c], want["hsi"][:, c, c])  # the labelled pixel stays
        assert got["label"] == want["label"] == label_of(row, col) - 1
        # the (p+1) window centred on the pixel, transformed, without its first row and column
        top = row + pad - p // 2
        centred = scene["hsi"][:, top:top + p + 1, col + pad - p // 2:col + pad - p // 2 + p + 1]
        codes = [k for k in range(8) if np.array_equal(np_dihedral(centred, k)[:, 1:, 1:], got["hsi"])]
        assert len(codes) == 1, codes
        code = codes[0]
        seen.append(code)
        fine = scene["pan"][:, top * R:(top + p + 1) * R, (col + pad - p // 2) * R:(col + pad - p // 2 + p + 1) * R]
        np.testing.assert_array_equal(got["pan"], np_dihedral(fine, code)[:, R:, R:])
        np.testing.assert_array_equal(got["pan"][:2], got["hsi"].repeat(R, axis=1).repeat(R, axis=2))
        if code == 0:  # the identity gives today's patch exactly
            np.testing.assert_array_equal(got["hsi"], want["hsi"])
            np.testing.assert_array_equal(got["pan"], want["pan"])
    assert set(seen) == set(range(8))


@pytest.mark.parametrize("augment", [None, {}, {"flip": False, "rotate": False, "noise_std": 0.0}])
def test_off_by_default_batches_are_bitwise_todays(coordinate_scene, augment):
    options = dict(sampling="pixel", patch_size=4, allow_even_patch=True, normalization="zscore", pad_mode="reflect")
    dm = _datamodule(coordinate_scene, **options) if augment is None else \
        _datamodule(coordinate_scene, augment=augment, **options)
    assert dm.augmenter is None
    model = _fit(dm, 1)
    dm.trainer = None
    today = RasterDataModule(modalities={"hsi": coordinate_scene["hsi"], "pan": coordinate_scene["pan"]},
                             train_labels=coordinate_scene["train"], test_labels=coordinate_scene["test"],
                             split_block_size=4, batch_size=64, patch_size=4, allow_even_patch=True)
    today.setup("fit")
    L.seed_everything(0)
    expected = list(today.train_dataloader())
    assert len(expected) == len(model.train_batches)
    for want, (_, _, got) in zip(expected, model.train_batches):
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want)


def test_only_training_batches_are_augmented(coordinate_scene):
    options = dict(sampling="tile", patch_size=8, train_stride=4)
    raw = _fit(_datamodule(coordinate_scene, **options), 1)
    augmented = _fit(_datamodule(coordinate_scene, augment={"flip": True, "rotate": True, "noise_std": 0.1},
                                 **options), 1)
    assert len(raw.val_batches) == len(augmented.val_batches) > 0
    for want, got in zip(raw.val_batches, augmented.val_batches):
        assert all(torch.equal(want[k], got[k]) for k in want)
    assert not all(torch.equal(a[2]["hsi"], b[2]["hsi"]) for a, b in zip(raw.train_batches, augmented.train_batches))


def test_noise_has_the_asked_std_on_the_chosen_modalities_only():
    batch = {"hsi": torch.zeros(400, 4, 9, 9), "dsm": torch.ones(400, 1, 9, 9), "label": torch.arange(400)}
    augmenter = BatchAugmenter({"noise_std": {"hsi": 0.1}}, ["hsi", "dsm"])
    out = augmenter(batch, batch_generator(0, 0, 0, 0, "cpu"))
    noise = out["hsi"].double()
    n = noise.numel()
    assert abs(noise.mean().item()) < 5 * 0.1 / np.sqrt(n)
    assert abs(noise.std().item() / 0.1 - 1) < 5 / np.sqrt(2 * n)
    assert abs(np.corrcoef(noise[:, 0].ravel(), noise[:, 1].ravel())[0, 1]) < 5 / np.sqrt(n / 4)  # bands independent
    assert torch.equal(out["dsm"], batch["dsm"]) and torch.equal(out["label"], batch["label"])
    assert torch.equal(augmenter(batch, batch_generator(0, 0, 0, 0, "cpu"))["hsi"], out["hsi"])
    for other in (batch_generator(1, 0, 0, 0, "cpu"), batch_generator(0, 1, 0, 0, "cpu"),
                  batch_generator(0, 0, 1, 0, "cpu"), batch_generator(0, 0, 0, 1, "cpu")):
        assert not torch.equal(augmenter(batch, other)["hsi"], out["hsi"])
    everywhere = BatchAugmenter({"noise_std": 0.2}, ["hsi", "dsm"])(batch, batch_generator(0, 0, 0, 0, "cpu"))
    assert abs((everywhere["dsm"] - 1).std().item() / 0.2 - 1) < 0.05


def test_bad_augment_options_are_one_line_errors(coordinate_scene):
    with pytest.raises(InputError, match=r"augment: unknown keys \['flips'\]"):
        _datamodule(coordinate_scene, augment={"flips": True})
    with pytest.raises(InputError, match=r"augment.noise_std: unknown modalities \['lidar'\]"):
        _datamodule(coordinate_scene, augment={"noise_std": {"lidar": 0.1}})
    with pytest.raises(InputError, match="augment.noise_std must be finite and >= 0"):
        _datamodule(coordinate_scene, augment={"noise_std": -0.1})


def test_a_resumed_run_draws_the_same_augmentations(coordinate_scene, tmp_path):
    options = dict(sampling="tile", patch_size=8, train_stride=4, batch_size=16,
                   augment={"flip": True, "rotate": True, "noise_std": 0.1})
    straight = _fit(_datamodule(coordinate_scene, **options), 2)
    first = _fit(_datamodule(coordinate_scene, **options), 1, enable_checkpointing=True, default_root_dir=tmp_path)
    ckpt = next(tmp_path.rglob("*.ckpt"))
    resumed = Recorder()
    L.seed_everything(0)  # the config's seed, as a resumed CLI run sets it ...
    torch.rand(1000), np.random.rand(1000)  # ... but draws do not depend on the RNG state: (seed, epoch, batch) decide
    L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0).fit(
        resumed, datamodule=_datamodule(coordinate_scene, **options), ckpt_path=ckpt)
    epoch1 = [b for e, _, b in straight.train_batches if e == 1]
    assert [e for e, _, _ in resumed.train_batches] == [1] * len(epoch1) and len(epoch1) > 1
    for want, (_, _, got) in zip(epoch1, resumed.train_batches):
        assert all(torch.equal(want[k], got[k]) for k in want)
    for want, (_, _, got) in zip([b for e, _, b in straight.train_batches if e == 0], first.train_batches):
        assert all(torch.equal(want[k], got[k]) for k in want)


def test_cli_trains_a_shipped_config_with_augmentation_and_balanced_sampling(tmp_path, monkeypatch):
    from rsfusion.lightning_modules.commands.cli import main

    config = tiny_config(tmp_path, "baseline_ms_only_synthetic", dict(scene_height=24, scene_width=32,
                                                                      train_per_class=10, batch_size=16),
                         dict(width=8), max_epochs=10)
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(config), "--data.init_args.augment",
          "{flip: true, rotate: true, noise_std: {ms: 0.05}}", "--data.init_args.balanced_sampling", "true",
          "--trainer.max_steps", "3", "--test_after_fit", "false", "--map_after_fit", "false"])
    ckpt = torch.load(tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    hparams = ckpt["datamodule_hyper_parameters"]
    assert hparams["augment"] == {"flip": True, "rotate": True, "noise_std": {"ms": 0.05}}
    assert hparams["balanced_sampling"] is True and hparams["pad_mode"] == "reflect"
    assert yaml.safe_load(Path(config).read_text())["data"]["init_args"]["patch_size"] % 2 == 0  # even MS patches
