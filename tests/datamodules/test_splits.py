"""The papers' protocols: per-class sampling with a guard band, renumber_classes, val_fraction 0 (last epoch)."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import yaml
from scipy.spatial.distance import cdist

from rsfusion.datamodules import InputError, RasterDataModule, RasterError
from rsfusion.datamodules.splits import (
    per_class_quota,
    per_class_split,
    pixels_inside_patches,
    remap_labels,
    sample_per_class,
)
from tests.conftest import CONFIGS, write_tif

AUGSBURG = ["Forest", "Residential area", "Industrial area", "Low plants", "Allotment", "Commercial area", "Water"]


def _label_map(shape=(40, 50), seed=0) -> np.ndarray:
    """Square class regions 1..5, a 7-pixel class 6 and a 1-pixel class 7, unlabelled gaps."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.repeat(rng.integers(1, 6, size=(shape[0] // 10, shape[1] // 10)), 10, 0), 10, 1)
    labels[rng.random(shape) < 0.2] = 0
    labels[labels == 6] = 1
    labels[2, 3:10] = 6
    labels[30, 40] = 7
    return labels.astype(np.uint8)


def _chebyshev_to_train(train: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """For each (row, col) in ``pixels``, the Chebyshev distance to the nearest training pixel (brute force)."""
    return cdist(pixels, np.argwhere(train > 0), metric="chebyshev").min(axis=1)


# ---------------------------------------------------------------- per-class sampler

def test_exact_n_per_class_with_the_half_class_cap():
    labels = _label_map()
    counts = np.bincount(labels.ravel(), minlength=8)[1:]
    train = sample_per_class(labels, 20, seed=0)
    got = np.bincount(train.ravel(), minlength=8)[1:]
    assert (counts[:5] >= 40).all()
    np.testing.assert_array_equal(got[:5], 20)
    assert counts[5] == 7 and got[5] == 3  # min(20, floor(7 / 2))
    assert counts[6] == 1 and got[6] == 0  # a single pixel cannot be both train and test
    np.testing.assert_array_equal(train[train > 0], labels[train > 0])  # drawn pixels keep their class
    np.testing.assert_array_equal(per_class_quota(np.array([0, 1, 2, 3, 7, 40, 41]), 20), [0, 0, 1, 1, 3, 20, 20])
    np.testing.assert_array_equal(per_class_quota(np.array([0, 1, 7, 40]), 20, keep_test=False), [0, 1, 7, 20])


def test_fraction_per_class():
    labels = _label_map()
    counts = np.bincount(labels.ravel(), minlength=8)[1:]
    got = np.bincount(sample_per_class(labels, 0.1, seed=3).ravel(), minlength=8)[1:]
    np.testing.assert_array_equal(got[:5], np.rint(0.1 * counts[:5]))
    assert got[5] == 1 and got[6] == 0  # at least one pixel, never the whole class
    np.testing.assert_array_equal(per_class_quota(np.array([1, 2, 10, 15]), 0.9), [0, 1, 9, 14])
    np.testing.assert_array_equal(per_class_quota(np.array([1, 2, 10, 15]), 0.9, keep_test=False), [1, 2, 9, 14])


@pytest.mark.parametrize("bad", [0, -3, 1.5, 2.25, True, "20"])
def test_bad_quota_is_refused(bad):
    with pytest.raises(InputError, match=r"train_per_class must be a whole number N >= 1 .* or a fraction in \(0, 1\)"):
        sample_per_class(_label_map(), bad, seed=0)


@pytest.mark.parametrize("guard", [0, 2, 5])
def test_split_is_a_disjoint_partition_and_the_guard_separates_test_from_train(guard):
    labels = _label_map()
    train, test, removed = per_class_split(labels, 10, seed=1, guard=guard)
    masks = [m > 0 for m in (train, test, removed)]
    assert not (masks[0] & masks[1]).any() and not (masks[0] & masks[2]).any() and not (masks[1] & masks[2]).any()
    np.testing.assert_array_equal(train + test + removed, labels)  # every labelled pixel lands exactly once
    distance_test = _chebyshev_to_train(train, np.argwhere(test > 0))
    assert distance_test.min() > guard  # no test pixel within the guard band
    if guard:
        assert removed.any() and _chebyshev_to_train(train, np.argwhere(removed > 0)).max() <= guard
    else:
        assert not removed.any()


@pytest.mark.parametrize("patch_size", [5, 11, 16])
def test_default_guard_leaves_no_test_pixel_inside_a_training_patch(patch_size):
    labels = _label_map()
    train, test, _ = per_class_split(labels, 15, seed=2, guard=patch_size // 2)
    assert pixels_inside_patches(train, test, patch_size) == 0
    train0, test0, _ = per_class_split(labels, 15, seed=2, guard=0)
    assert pixels_inside_patches(train0, test0, patch_size) > 0  # without the guard the trap is real


def test_deterministic_per_seed_and_different_across_seeds():
    labels = _label_map()
    first = per_class_split(labels, 20, seed=5, guard=3)
    again = per_class_split(labels, 20, seed=5, guard=3)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    others = [sample_per_class(labels, 20, seed=s) for s in (0, 1, 2)]
    assert all((others[i] != others[j]).any() for i in range(3) for j in range(i + 1, 3))


# ---------------------------------------------------------------- renumber_classes

def test_renumber_classes_merges_renumbers_and_drops():
    labels = np.array([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=np.uint8)
    xian_urban = {1: 1, 2: 2, 3: 2, 4: 2, 5: 3, 6: 4, 7: 3}  # BMoAMamba's merge of Xi'an Urban's 7 classes
    np.testing.assert_array_equal(remap_labels(labels, xian_urban, "x"), [[0, 1, 2, 2], [2, 3, 4, 3]])
    np.testing.assert_array_equal(remap_labels(labels, {1: 2, 2: 1, 3: 0, 4: 0, 5: 3, 6: 3, 7: 0}, "x"),
                                  [[0, 2, 1, 0], [0, 3, 3, 0]])


def test_renumber_classes_errors():
    labels = np.array([[0, 1, 2, 9]], dtype=np.uint8)
    with pytest.raises(RasterError, match=r"^train\.tif: label values \[2, 9\] are not in renumber_classes "
                                          r"\(keys \[1, 3\]\); "
                                          r"map every class \(0 = drop it\)$"):
        remap_labels(labels, {1: 1, 3: 2}, "train.tif")
    with pytest.raises(InputError, match="key 0 is the unlabelled value"):
        remap_labels(labels, {0: 1, 1: 1, 2: 1, 9: 2}, "train.tif")
    with pytest.raises(InputError, match=r"new values must be 0 \(drop\) or classes 1..K, got \[-1, 1\]"):
        remap_labels(labels, {1: 1, 2: -1, 9: 1}, "train.tif")


@pytest.fixture
def scene(tmp_path):
    rng = np.random.default_rng(0)
    labels = _label_map()
    paths = {"hsi": write_tif(tmp_path / "hsi.tif", rng.normal(size=(4, *labels.shape)).astype(np.float32)),
             "labels": write_tif(tmp_path / "labels.tif", labels), "dir": tmp_path}
    return paths, labels


def test_renumber_classes_in_the_datamodule_applies_to_every_map_before_the_split(scene):
    paths, labels = scene
    merge = {1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 6: 3, 7: 0}
    dm = RasterDataModule({"hsi": str(paths["hsi"])}, labels=str(paths["labels"]), renumber_classes=merge,
                          class_names=["A", "B", "C"], train_per_class=10, patch_size=5, val_fraction=0)
    assert dm.num_classes == 3
    merged = remap_labels(labels, merge, "")
    split = dm.label_rasters["train"] + dm.label_rasters["test"] + per_class_split(merged, 10, 0, 2)[2]
    np.testing.assert_array_equal(split, merged)
    np.testing.assert_array_equal(np.bincount(dm.label_rasters["train"].ravel(), minlength=4)[1:], [10, 10, 10])
    with pytest.raises(InputError, match=r"renumber_classes maps to classes 1..3 but class_names names 7"):
        RasterDataModule({"hsi": str(paths["hsi"])}, labels=str(paths["labels"]), renumber_classes=merge,
                         class_names=AUGSBURG)
    with pytest.raises(RasterError, match=r"labels\.tif: label values \[6, 7\] are not in renumber_classes"):
        RasterDataModule({"hsi": str(paths["hsi"])}, labels=str(paths["labels"]),
                         renumber_classes={k: 1 for k in range(1, 6)})


def test_label_map_is_read_as_the_old_spelling_of_renumber_classes(scene):
    paths, _ = scene
    merge = {1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 6: 3, 7: 0}
    common = dict(modalities={"hsi": str(paths["hsi"])}, labels=str(paths["labels"]), train_per_class=10,
                  patch_size=5, val_fraction=0)
    new, old = RasterDataModule(renumber_classes=merge, **common), RasterDataModule(label_map=merge, **common)
    assert old.num_classes == new.num_classes == 3
    for split in ("train", "test"):
        np.testing.assert_array_equal(old.label_rasters[split], new.label_rasters[split])
    assert old.label_maps is old.label_rasters  # the attribute's old name too
    with pytest.raises(InputError, match=r"^renumber_classes and label_map are the same option \(label_map is its "
                                         r"old spelling\): give one$"):
        RasterDataModule(renumber_classes=merge, label_map=merge, **common)


# ---------------------------------------------------------------- the DataModule's protocols

def test_per_class_protocol_on_a_single_map_reports_the_guard(scene, caplog):
    paths, labels = scene
    common = dict(modalities={"hsi": str(paths["hsi"])}, labels=str(paths["labels"]), train_per_class=20, seed=4,
                  patch_size=7, val_fraction=0)
    with caplog.at_level(logging.INFO), pytest.warns(UserWarning, match=r"class 7 \(class 7\) has no training pixel"):
        dm = RasterDataModule(**common)  # the 1-pixel class cannot be sampled: named, not fatal
    train, test, removed = per_class_split(labels, 20, seed=4, guard=3)
    np.testing.assert_array_equal(dm.label_rasters["train"], train)
    np.testing.assert_array_equal(dm.label_rasters["test"], test)
    assert not dm.has_validation and "val" not in dm.label_rasters
    np.testing.assert_array_equal(dm.guard_removed, np.bincount(removed.ravel(), minlength=8)[1:])
    removed_count = int((removed > 0).sum())
    assert f"Guard band of 3 px around the training pixels removed {removed_count} test pixels" in caplog.text
    assert "training pixels class 1 20, class 2 20, class 3 20, class 4 20, class 5 20, class 6 3, class 7 0" \
        in caplog.text
    dm.setup("fit")
    assert dm.leakage == 0 and len(dm.train_dataset) == 103
    with pytest.raises(RasterError, match=r"labels\.tif: class 7 \(Water\) has no training pixel"):
        RasterDataModule(**common, class_names=AUGSBURG)  # fixed classes: refused


def test_per_class_on_official_maps_subsamples_train_and_keeps_the_test_map(scene):
    paths, labels = scene
    rng = np.random.default_rng(1)
    coin = rng.random(labels.shape)
    train_map, test_map = np.where(coin < 0.5, labels, 0), np.where(coin >= 0.5, labels, 0)
    tr, te = write_tif(paths["dir"] / "tr.tif", train_map), write_tif(paths["dir"] / "te.tif", test_map)
    dm = RasterDataModule({"hsi": str(paths["hsi"])}, train_labels=str(tr), test_labels=str(te),
                          train_per_class=5, patch_size=5, val_fraction=0, seed=9)
    np.testing.assert_array_equal(dm.label_rasters["train"], sample_per_class(train_map, 5, seed=9, keep_test=False))
    np.testing.assert_array_equal(dm.label_rasters["test"], test_map)
    # the test set is elsewhere: a small class gives all its training pixels, not half of them
    counts = np.bincount(train_map.ravel(), minlength=8)[1:]
    np.testing.assert_array_equal(np.bincount(dm.label_rasters["train"].ravel(), minlength=8)[1:],
                                  np.minimum(counts, 5))
    assert 0 < counts[5] < 5
    assert dm.guard_removed is None


def test_validation_options(scene):
    paths, _ = scene
    common = dict(modalities={"hsi": str(paths["hsi"])}, labels=str(paths["labels"]), train_per_class=20,
                  patch_size=5)
    with_val = RasterDataModule(**common, val_fraction=0.2, seed=1)
    pool = sample_per_class(_label_map(), 20, seed=1)
    np.testing.assert_array_equal(with_val.label_rasters["train"] + with_val.label_rasters["val"], pool)
    assert with_val.has_validation and 0 < (with_val.label_rasters["val"] > 0).sum() < (pool > 0).sum()
    for bad in (-0.1, 1.0):
        with pytest.raises(InputError, match=rf"val_fraction must be in \[0, 1\) \(0 = no validation set\), got {bad}"):
            RasterDataModule(**common, val_fraction=bad)
    no_val = RasterDataModule(**common, val_fraction=0)
    assert no_val.val_dataloader() == []
    with pytest.raises(InputError, match="no validation set .* nothing to validate"):
        no_val.setup("validate")
    leaking = write_tif(paths["dir"] / "val.tif", no_val.label_rasters["test"])
    with pytest.raises(RasterError, match=r"val\.tif and .*labels\.tif: \d+ pixels are labelled in both val and test"):
        RasterDataModule(**common, val_labels=str(leaking))


# ---------------------------------------------------------------- through the console script

def _augsburg_copy(root: Path) -> np.ndarray:
    """A tiny copy with the Augsburg file names and keys; Commercial area has 7 training pixels, as in the
    real release. Returns the training map."""
    rng = np.random.default_rng(0)
    h, w = 24, 30
    gt = np.repeat(np.repeat(rng.integers(1, 8, size=(4, 5)), 6, 0), 6, 1)
    gt[gt == 6] = 7
    coin = rng.random((h, w))
    train, test = np.where(coin < 0.2, gt, 0), np.where(coin > 0.5, gt, 0)
    train[0, 10:17], test[0, 10:17], train[1, 10:17], test[1, 10:17] = 6, 0, 0, 6  # 7 Commercial training pixels
    root.mkdir()
    scipy.io.savemat(root / "data_hsi.mat", {"data": (rng.normal(size=(h, w, 12)) + gt[..., None]).astype(np.float32)})
    scipy.io.savemat(root / "data_sar.mat", {"data": (rng.normal(size=(h, w, 4)) + gt[..., None]).astype(np.float32)})
    scipy.io.savemat(root / "mask_train.mat", {"mask_train": train.astype(np.uint8)})
    scipy.io.savemat(root / "mask_test.mat", {"mask_test": test.astype(np.uint8)})
    return train


def _printed_test_metrics(text: str) -> dict[str, float]:
    metrics = {}
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│|]", line) if c.strip()]
        if len(cells) == 2 and cells[0].startswith("test/"):
            metrics[cells[0]] = float(cells[1])
    return metrics


@pytest.mark.slow
def test_val_fraction_zero_trains_on_every_training_pixel_and_tests_the_last_epoch(tmp_path, monkeypatch, capsys,
                                                                                     caplog):
    from rsfusion.lightning_modules.commands.cli import RSFusionCLI, cli_kwargs, main

    monkeypatch.chdir(tmp_path)  # the shipped config writes under runs/baseline_augsburg
    train = _augsburg_copy(tmp_path / "augsburg")
    assert (train == 6).sum() == 7
    runs = tmp_path / "runs" / "baseline_augsburg" / "version_0"
    args = ["--config", str(CONFIGS / "baseline_augsburg.yaml"), "--data.init_args.root", str(tmp_path / "augsburg"),
            "--data.init_args.val_fraction", "0", "--data.init_args.batch_size", "16", "--model.init_args.width", "8",
            "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false", "--map_after_fit", "false"]
    cli = RSFusionCLI(**cli_kwargs(), args=args, run=False)  # what `fit` builds, inspected before training
    np.testing.assert_array_equal(cli.datamodule.label_rasters["train"], train)  # every official training pixel
    assert not cli.datamodule.has_validation and cli.trainer.limit_val_batches == 0
    assert [cb.monitor for cb in cli.trainer.checkpoint_callbacks] == [None]  # the val/OA selector is gone

    capsys.readouterr()
    with caplog.at_level(logging.INFO):
        main(["fit", *args])
    fit_out = capsys.readouterr().out
    last = (runs / "checkpoints" / "last.ckpt").resolve()
    assert sorted(p.name for p in (runs / "checkpoints").iterdir()) == ["last.ckpt"]  # no empty best-* selection
    assert f"Evaluating the last checkpoint: {last}" in caplog.text
    assert f"Restoring states from the checkpoint path at {last}" in caplog.text
    checkpoint = torch.load(last, weights_only=True)
    n_train = int((train > 0).sum())
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == 2 * -(-n_train // 16)  # 2 full epochs
    metrics = _printed_test_metrics(fit_out)
    assert set(metrics) >= {"test/OA", "test/AA", "test/kappa", "test/acc_Commercial area"}

    main(["test", *args, "--ckpt_path", str(last)])
    assert _printed_test_metrics(capsys.readouterr().out) == metrics


@pytest.mark.slow
def test_split_seed_follows_the_run_seed_and_a_checkpoint_refuses_another_split(scene, tmp_path, capsys):
    from rsfusion.lightning_modules.commands.cli import RSFusionCLI, cli_kwargs, main
    from rsfusion.lightning_modules.commands.compare import run_args

    paths, labels = scene
    config = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    config["data"] = {"class_path": "rsfusion.datamodules.RasterDataModule",
                      "init_args": {"modalities": {"hsi": str(paths["hsi"])}, "labels": str(paths["labels"]),
                                    "train_per_class": 8, "val_fraction": 0, "patch_size": 5, "batch_size": 16}}
    config["model"]["init_args"]["width"] = 8
    config["trainer"].update(max_epochs=1, enable_progress_bar=False, enable_model_summary=False)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    maps = {}
    for seed in (0, 1, 2):  # rsfusion-compare --seeds 0 1 2 runs each seed like this
        cli = RSFusionCLI(**cli_kwargs(), args=run_args(path, tmp_path, "cnn", seed, []), run=False)
        assert cli.datamodule.hparams.seed == seed
        maps[seed] = cli.datamodule.label_rasters["train"]
        np.testing.assert_array_equal(maps[seed], sample_per_class(labels, 8, seed))
    assert (maps[0] != maps[1]).any() and (maps[1] != maps[2]).any()
    fixed = RSFusionCLI(**cli_kwargs(), args=[*run_args(path, tmp_path, "cnn", 2, []), "--data.init_args.seed", "0"],
                        run=False)
    np.testing.assert_array_equal(fixed.datamodule.label_rasters["train"], maps[0])  # an explicit data seed wins

    seed0 = run_args(path, tmp_path, "cnn", 0, [])
    main(["fit", *seed0, "--map_after_fit", "false"])
    last = tmp_path / "cnn" / "seed0" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["test", *seed0, "--seed_everything", "1", "--ckpt_path", str(last)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"error: .*labels\.tif: the checkpoint was trained on another split of these labels \(split "
                        r"seed 0, here 1\): .* pass --data\.init_args\.seed 0 .*", err), err
    main(["test", *seed0, "--seed_everything", "1", "--data.init_args.seed", "0", "--ckpt_path", str(last)])
    assert "test/OA" in capsys.readouterr().out


def test_the_xian_urban_example_in_the_das2f_config(tmp_path):
    """The commented ``renumber_classes`` of configs/das2f_xian.yaml, uncommented, merges an MS/PAN copy's classes."""
    from rsfusion.datamodules import MSPanDataModule
    from rsfusion.datamodules.synthetic import make_mspan_scene

    example = re.search(r"^\s*# (renumber_classes: .*)$", (CONFIGS / "das2f_xian.yaml").read_text(), re.M).group(1)
    renumber = yaml.safe_load(example)["renumber_classes"]
    assert renumber == {1: 1, 2: 2, 3: 2, 4: 2, 5: 3, 6: 4, 7: 3}
    paths = make_mspan_scene(tmp_path, height=24, width=20, train_per_class=8)
    dm = MSPanDataModule(root=str(tmp_path), patch_size=4, renumber_classes=renumber, val_fraction=0)
    raw = np.load(paths["train"])
    assert dm.num_classes == 4 and dm.class_names == ["class 1", "class 2", "class 3", "class 4"]
    np.testing.assert_array_equal(dm.label_rasters["train"], np.array([0, 1, 2, 2, 2, 3, 4, 3])[raw])
