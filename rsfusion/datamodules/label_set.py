"""The labels a RasterDataModule trains and evaluates on: label rasters (or coordinate lists into a class
raster) read, renumbered, divided by the split protocol and checked, with their fingerprint.

Protocols (chosen by what is given, see :class:`~rsfusion.datamodules.raster.RasterDataModule`):
official train/test rasters, optionally subsampled per class; one label raster divided by
``train_per_class`` (per-class sampling with a guard band) or by spatial blocks (``test_fraction``);
and a validation set from ``val_labels`` or a block split of the training pixels (``val_fraction``).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from rsfusion.datamodules.errors import InputError, RasterError
from rsfusion.datamodules.io import RasterHeader
from rsfusion.datamodules.label_sources import ClassRaster, read_split_labels
from rsfusion.datamodules.splits import block_split, check_per_class, per_class_split, remap_labels, sample_per_class

__all__ = ["LabelSet", "SplitProtocol", "labels_digest", "read_label_set"]


@dataclass(frozen=True)
class SplitProtocol:
    """How given labels become train/val/test sets (the RasterDataModule options of the same names)."""

    train_per_class: int | float | None
    val_fraction: float
    test_fraction: float
    block_size: int
    guard: int
    seed: int


@dataclass
class LabelSet:
    """What a DataModule trains and evaluates on.

    ``rasters``: the ``train``/``val``/``test`` label rasters on the reference grid (0 = unlabelled,
    1..K = classes), None for a scene that is only predicted; ``digest``: SHA-256 of the labels as read,
    before the split (checkpoints keep it with the split's own); ``guard_removed``: per class, the test
    pixels the per-class guard band removed (None when there was none).
    """

    rasters: dict[str, np.ndarray] | None
    num_classes: int
    class_names: list[str]
    digest: str | None = None
    guard_removed: np.ndarray | None = None


def labels_digest(rasters: dict[str, np.ndarray]) -> str:
    """SHA-256 of named label rasters (names, shapes and values)."""
    digest = hashlib.sha256()
    for name in sorted(rasters):
        digest.update(f"{name}{rasters[name].shape}".encode())
        digest.update(np.ascontiguousarray(rasters[name], dtype=np.int32).tobytes())
    return digest.hexdigest()


def read_label_set(reference: RasterHeader, paths: dict[str, str | None], class_names: list[str] | None,
                   renumber_classes: dict[int, int] | None, label_nodata: int | None, class_raster: str | None,
                   coordinate_base: int, protocol: SplitProtocol, modalities: dict[str, str]) -> LabelSet:
    """Read ``paths`` (``train``, ``test``, ``val`` rasters or ``all`` to divide; None = not given), renumber
    them by ``renumber_classes``, divide them by ``protocol`` and check the result; a scene without labels
    needs ``class_names``. ``modalities`` name the scene's files in messages."""
    fixed_k = len(class_names) if class_names else None
    rasters = _read(reference, paths, fixed_k, renumber_classes, label_nodata, class_raster, coordinate_base)
    if not rasters and fixed_k is None:
        raise InputError(f"{', '.join(modalities.values())}: no label maps and no class_names; give "
                         "class_names to predict (or --ckpt_path, which supplies them), label maps to train")
    num_classes = fixed_k or int(max(renumber_classes.values()) if renumber_classes
                                 else max(m.max() for m in rasters.values()))
    given = paths.get("all") or paths.get("train")
    if num_classes < 1:
        raise RasterError(f"{given}: no labelled pixel (0 = unlabelled, 1..K = classes)")
    labels = LabelSet(None, num_classes, list(class_names) if class_names else
                      [f"class {k}" for k in range(1, num_classes + 1)])
    if not rasters:
        return labels
    labels.digest = labels_digest(rasters)
    labels.rasters = _divide(labels, rasters, protocol)
    _check(labels, paths, fixed_k is not None)
    return labels


def _read(reference, paths, fixed_k, renumber_classes, label_nodata, class_raster,
          coordinate_base) -> dict[str, np.ndarray]:
    """Every given label raster (or coordinate list into ``class_raster``); ``renumber_classes`` renumbers the classes
    before anything else."""
    if renumber_classes and fixed_k is not None and max(renumber_classes.values()) != fixed_k:
        raise InputError(f"renumber_classes maps to classes 1..{max(renumber_classes.values())} but class_names names "
                         f"{fixed_k}: give one name per new class")
    check_k = None if renumber_classes else fixed_k
    coordinates_into = class_raster and ClassRaster.read(reference, class_raster, check_k, label_nodata,
                                                         coordinate_base)
    rasters = {}
    for split, path in paths.items():
        if path is None:
            continue
        values = read_split_labels(reference, path, check_k, label_nodata, coordinates_into)
        if renumber_classes:
            values = remap_labels(values, renumber_classes, path)
        rasters[split] = values.astype(np.int16 if values.max() < 2 ** 15 else np.int32)
    return rasters


def _divide(labels: LabelSet, rasters: dict[str, np.ndarray], p: SplitProtocol) -> dict[str, np.ndarray]:
    """train/val/test rasters from the given ones by the protocol."""
    if not 0 <= p.val_fraction < 1:
        raise InputError(f"val_fraction must be in [0, 1) (0 = no validation set), got {p.val_fraction}")
    rasters = dict(rasters)
    if p.train_per_class is not None:
        check_per_class(p.train_per_class)
    if "all" in rasters and p.train_per_class is not None:
        rasters["train"], rasters["test"], removed = per_class_split(rasters["all"], p.train_per_class, p.seed,
                                                                     p.guard)
        _log_per_class(labels, rasters["train"], removed, p)
    elif "all" in rasters:
        if not 0 < p.test_fraction < 1:
            raise InputError(f"test_fraction must be in (0, 1), got {p.test_fraction}")
        everything = rasters["all"]  # kept: the split card counts it
        rasters["train"], rasters["test"] = block_split(everything, p.test_fraction, p.block_size, p.seed, p.guard)
        dropped = int((everything > 0).sum() - (rasters["train"] > 0).sum() - (rasters["test"] > 0).sum())
        rank_zero_info(f"Block split (seed {p.seed}): the guard band of {p.guard} px removed {dropped} training "
                       "pixels around the test blocks")
    elif p.train_per_class is not None:  # official rasters: subsample the training set, keep the official test set
        rasters["train"] = sample_per_class(rasters["train"], p.train_per_class, p.seed, keep_test=False)
        _log_per_class(labels, rasters["train"], None, p)
    if "val" not in rasters and p.val_fraction > 0:
        rasters["train"], rasters["val"] = block_split(rasters["train"], p.val_fraction, p.block_size, p.seed + 1)
    return rasters


def _log_per_class(labels: LabelSet, train: np.ndarray, removed: np.ndarray | None, p: SplitProtocol) -> None:
    counts = np.bincount(train.ravel(), minlength=labels.num_classes + 1)[1:]
    summary = ", ".join(f"{name} {n}" for name, n in zip(labels.class_names, counts))
    rank_zero_info(f"Per-class sampling (train_per_class {p.train_per_class}, seed {p.seed}): training pixels "
                   f"{summary}")
    if removed is None:
        return
    labels.guard_removed = np.bincount(removed.ravel(), minlength=labels.num_classes + 1)[1:]
    detail = ", ".join(f"{name} {n}" for name, n in zip(labels.class_names, labels.guard_removed) if n)
    rank_zero_info(f"Guard band of {p.guard} px around the training pixels removed {int(labels.guard_removed.sum())} "
                   f"test pixels{f' ({detail})' if detail else ''}")


def _check(labels: LabelSet, paths: dict[str, str | None], configured: bool) -> None:
    """Every set non-empty, no pixel in both train (or val) and test, every class trained."""
    rasters = labels.rasters
    train_path, test_path = paths.get("train") or paths.get("all"), paths.get("test") or paths.get("all")
    for split in ("train", "val", "test"):
        if split in rasters and not (rasters[split] > 0).any():
            raise RasterError(f"{train_path if split != 'test' else test_path}: the {split} set is empty")
    val_path = paths.get("val") or train_path
    for first, path in (("train", train_path), ("val", val_path)):  # selecting on test pixels is leakage too
        both = (rasters[first] > 0) & (rasters["test"] > 0) if first in rasters else None
        if both is not None and both.any():
            r, c = np.argwhere(both)[0]
            raise RasterError(f"{path} and {test_path}: {int(both.sum())} pixels are labelled in both "
                              f"{first} and test (first at row {r}, col {c})")
    counts = np.bincount(rasters["train"].ravel(), minlength=labels.num_classes + 1)[1:]
    for k in np.flatnonzero(counts == 0):
        message = f"{train_path}: class {k + 1} ({labels.class_names[k]}) has no training pixel"
        if configured:
            raise RasterError(message)
        rank_zero_warn(message)
