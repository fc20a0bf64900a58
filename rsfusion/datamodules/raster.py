"""``RasterDataModule``: any set of co-registered rasters + label maps -> patch or tile batches."""
from __future__ import annotations

import hashlib
import logging
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from rsfusion.datamodules.augment import Augment, BatchAugmenter, batch_generator
from rsfusion.datamodules.checkpoint_inputs import check_modalities, input_options
from rsfusion.datamodules.errors import InputError, RasterError
from rsfusion.datamodules.io import is_gdal_raster, read_header
from rsfusion.datamodules.label_sources import ClassMap, read_split_labels
from rsfusion.datamodules.normalization import Normalization, Normalizer, fit_normalizers
from rsfusion.datamodules.pretrain_tiles import RandomSceneTiles
from rsfusion.datamodules.sampling import (
    IGNORE_INDEX,
    ClassBalancedSampler,
    EpochShuffleSampler,
    PixelPatchDataset,
    TileDataset,
    balanced_classes,
    collate,
)
from rsfusion.datamodules.scene import PadMode, Scene, borrow_georeferencing, grid_ratios, load_scene, reference_header
from rsfusion.datamodules.splits import (
    block_split,
    check_per_class,
    per_class_split,
    pixels_inside_patches,
    remap_labels,
    sample_per_class,
)
from rsfusion.datamodules.tiling import covering_tiles, grid_windows, strided_tiles
from rsfusion.datamodules.windows import SceneSource, WindowedPredictDataset

log = logging.getLogger(__name__)

# A palette with distinct, print-friendly colours (black is kept for "no data").
DEFAULT_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128),
]


def _same_normalizer(a: Normalizer, b: Normalizer | None) -> bool:
    if b is None:
        return False
    sa, sb = a.state(), b.state()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and np.allclose(sa[k], sb[k], rtol=1e-3, atol=1e-5) for k in sa)


def _digest(maps: dict[str, np.ndarray]) -> str:
    """SHA-256 of named label maps (names, shapes and values)."""
    digest = hashlib.sha256()
    for name in sorted(maps):
        digest.update(f"{name}{maps[name].shape}".encode())
        digest.update(np.ascontiguousarray(maps[name], dtype=np.int32).tobytes())
    return digest.hexdigest()


class RasterDataModule(L.LightningDataModule):
    """Co-registered rasters of several modalities with train/test (and optional val) label maps.

    Args:
        modalities: modality name -> raster path (GeoTIFF or anything GDAL reads, ``.npy`` (H, W[, C]),
            ``.mat`` with ``file.mat:KEY``). The order is the order the model sees them, primary
            first. Finer modalities must sit at an integer resolution ratio over the same extent
            (PAN at 4x MS): their patches cover the same ground at r times the size.
        train_labels, test_labels, val_labels: label maps on the coarsest modality's grid, 0 =
            unlabelled, 1..K = classes. Without ``val_labels`` a stratified validation split of
            ``val_fraction`` is taken from the training labels in spatial blocks of
            ``split_block_size`` pixels; ``val_fraction: 0`` keeps every training pixel for training,
            runs no validation loop, and the run keeps its last epoch. No label map at all: a scene to predict only
            (``class_names``
            then fixes K; ``lightning predict --ckpt_path`` takes them from the checkpoint).
        labels: a single label map instead of train/test maps: split into spatially disjoint blocks
            (``test_fraction`` for test), with a guard band of ``guard`` pixels (default: half a patch)
            removed from training around test blocks; or, with ``train_per_class``, by per-class
            sampling.
        train_per_class: N training pixels per class drawn at random, or that fraction of each class
            when < 1. With ``labels``: at most half of each class; every other labelled pixel is test,
            except the test pixels within ``guard`` pixels of a training pixel (removed and reported:
            no test pixel lies inside a training patch). With train/test maps: N per class (at most
            all) are drawn from the training map, the others are not used, and the official test map
            is kept whole.
            Validation then comes from the drawn pixels (``val_fraction``) or ``val_labels``.
        label_map: old class value -> new class value (0 = unlabelled), applied to every label map
            right after reading, e.g. ``{1: 1, 2: 2, 3: 2}`` merges classes 2 and 3. Every class value
            in the maps must be a key; ``class_names`` then names the new classes.
        seed: the data seed: random splits (validation blocks use ``seed + 1``), the training order
            (per epoch), the augmentation draws and the ``clip_percentile`` sample. ``None`` (default):
            the run's ``seed_everything`` (the CLI fills it in; 0 outside the CLI), so runs with
            different seeds draw different splits; set it to keep one split across seeds.
        class_names: names of classes 1..K; fixes K (labels above K are an error). Default: K from the
            maps and names "class k".
        sampling: ``pixel`` = one sample per labelled pixel with a ``patch_size`` window centred on it
            (label = the centre's class); ``tile`` = dense ``patch_size`` tiles at ``train_stride`` for
            training and a covering grid (each pixel once, edges included) for evaluation.
        allow_even_patch: accept an even ``patch_size`` with ``pixel`` sampling (the pixel then sits
            at index (p-1)//2, e.g. 7 of 16, as in the MS/PAN literature). Default (None): refused,
            except by the MS/PAN DataModules.
        normalization: per-band ``zscore``, ``minmax``, ``minmax_global`` (one min/max for all bands of
            a modality) or ``none``; ``normalization_overrides`` sets it per modality.
        normalize_on: fit statistics on every valid pixel of the ``scene`` (what the papers do) or on
            ``train`` pixels only (no transductive leakage).
        clip_percentile: clip each band to [q, 100 - q] percentiles before normalising (robust).
        pca: modality -> number of principal components to keep (e.g. ``{"hsi": 30}``).
        nodata: modality -> nodata value overriding the file's own.
        label_nodata: a label value that means "unlabelled" besides 0 (e.g. -1 in MUUFL).
        predict_window: full-scene prediction reads the scene in windows of this many reference
            pixels (plus a patch-sized halo) instead of loading it whole: memory is bounded by the
            window, not the scene. The map equals the in-memory one. Normalisation statistics come
            from the checkpoint (saved by training), else from a streaming pass over the windows.
        pad_mode: what patches and tiles see beyond the scene edge: the mirrored image (``reflect``)
            or ``zero`` in normalised units (M3amba's authors zero-pad min-max data); nodata pixels
            inside the scene are filled as before either way.
        augment: training-batch augmentation (:class:`~rsfusion.datamodules.augment.Augment`), off by default:
            ``{flip: true, rotate: true, noise_std: 0.05}`` (or ``noise_std: {hsi: 0.05}`` for some
            modalities). Flips/rotations are the same for every modality and the tile labels; an even
            ``pixel`` patch is turned about its pixel (cut one larger, transformed, cropped back).
        balanced_sampling: draw training samples with probability inversely proportional to their
            class's size (as many per epoch, with replacement); a tile counts as its rarest labelled
            class (fewest training pixels in the map).
        class_map: a full label map on the scene grid; train/test/val labels given as N x 2 arrays of
            (row, col) coordinates (e.g. ``berlin_index.mat:berlin_train``) take their classes from it.
        coordinate_base: index of the first row/column in such lists: 0 (NumPy, default) or 1 (MATLAB).
        pretrain_tiles: ``{tile: T, per_epoch: N}`` trains on N random unlabelled T x T tiles of the whole
            scene per epoch (flips, rot90; :mod:`rsfusion.datamodules.pretrain_tiles`) instead of labelled
            samples: BDGF's DDPM (``BDGFPretrain``). Validation and test keep their labelled samples.

    Maps are written on the reference grid with its georeferencing; when the reference is an array
    without one (``.mat``, ``.npy``), the transform (and CRS, if any) of the first georeferenced input
    is used and the log says so.

    What happens when: ``__init__`` reads no raster pixel. It reads the rasters' headers (band counts
    for ``in_channels``, grids, georeferencing) and the label maps, and makes the splits (per-class
    sampling, spatial blocks, validation blocks, guard bands) with their checks: all of it on the
    label grid, small integer maps next to a scene of many float bands, and all of it what the CLI
    links into the model (``in_channels``, ``num_classes``, ``class_names``, ``dense``,
    ``patch_size``) or needs to build the Trainer (``has_validation``), so every one-line error about
    grids, labels and splits comes while the CLI instantiates its classes, before the Trainer starts
    or DDP processes spawn. ``setup`` does the heavy part: reading and normalising the scene's pixels
    (:meth:`load`), the datasets and the leakage count. ``lightning fit --print_config`` builds
    nothing: it reads neither headers nor pixels.
    """

    def __init__(
        self,
        modalities: dict[str, str],
        train_labels: str | None = None,
        test_labels: str | None = None,
        val_labels: str | None = None,
        labels: str | None = None,
        class_names: list[str] | None = None,
        palette: list[tuple[int, int, int]] | None = None,
        sampling: Literal["pixel", "tile"] = "pixel",
        patch_size: int = 11,
        train_stride: int = 8,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        normalization: Normalization = "zscore",
        normalization_overrides: dict[str, Normalization] | None = None,
        normalize_on: Literal["scene", "train"] = "scene",
        clip_percentile: float | None = None,
        pca: dict[str, int] | None = None,
        nodata: dict[str, float] | None = None,
        label_nodata: int | None = None,
        label_map: dict[int, int] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.5,
        train_per_class: int | float | None = None,
        split_block_size: int = 16,
        guard: int | None = None,
        seed: int | None = None,
        allow_even_patch: bool | None = None,
        predict_window: int | None = None,
        pad_mode: PadMode = "reflect",
        augment: Augment | None = None,
        balanced_sampling: bool = False,
        class_map: str | None = None,
        coordinate_base: int = 0,
        pretrain_tiles: dict[str, int] | None = None,
    ):
        super().__init__()
        # class names reach the model through the CLI's link; saving them here too would clash
        self.save_hyperparameters(ignore=["class_names", "palette"])
        if not modalities:
            raise InputError("modalities: give at least one modality name -> raster path")
        for option, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"{option} must be a positive number of samples, got {value!r}")
        if patch_size < 1:
            raise InputError(f"patch_size must be positive, got {patch_size}")
        if sampling == "pixel" and patch_size % 2 == 0 and not allow_even_patch:
            raise InputError(f"patch_size {patch_size} is even: no pixel sits at the centre of the patch; use "
                             f"{patch_size + 1}, or set allow_even_patch: true "
                             f"(pixel at index {(patch_size - 1) // 2})")
        if predict_window is not None and predict_window < 1:
            raise InputError(f"predict_window must be a positive number of pixels, got {predict_window}")
        unlabelled = all(p is None for p in (labels, train_labels, test_labels, val_labels))
        if not unlabelled and ((labels is None) == (train_labels is None and test_labels is None) or
                               (labels is None and (train_labels is None or test_labels is None))):
            given = ", ".join(f"{k}: {v}" for k, v in (("labels", labels), ("train_labels", train_labels),
                                                       ("test_labels", test_labels), ("val_labels", val_labels))
                              if v is not None)
            raise InputError(f"label maps: give train_labels and test_labels, or a single labels map to split "
                             f"(given {given})")
        self.modalities = dict(modalities)
        self.sampling, self.patch_size, self.train_stride = sampling, patch_size, train_stride
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or 4 * batch_size
        self.num_workers = num_workers

        self._probe_layout([p for p in (train_labels, test_labels, val_labels, labels, class_map) if p is not None])

        self.class_names = list(class_names) if class_names else None
        self.hparams.seed = seed = 0 if seed is None else seed  # the CLI fills None with seed_everything
        maps = self._read_label_maps({"train": train_labels, "test": test_labels, "val": val_labels, "all": labels},
                                     label_map, label_nodata, class_map, coordinate_base)
        fixed_k = len(self.class_names) if self.class_names else None
        if unlabelled and fixed_k is None:
            raise InputError(f"{', '.join(self.modalities.values())}: no label maps and no class_names; give "
                             "class_names to predict (or --ckpt_path, which supplies them), label maps to train")
        self.num_classes = fixed_k or int(max(label_map.values()) if label_map else max(m.max() for m in maps.values()))
        if self.num_classes < 1:
            raise RasterError(f"{labels or train_labels}: no labelled pixel (0 = unlabelled, 1..K = classes)")
        if self.class_names is None:
            self.class_names = [f"class {k}" for k in range(1, self.num_classes + 1)]
        self.palette = [tuple(c) for c in palette] if palette else \
            [DEFAULT_PALETTE[k % len(DEFAULT_PALETTE)] for k in range(self.num_classes)]
        self.scene: Scene | None = None
        self.extra_modalities: dict[str, np.ndarray | str] = {}  # add_modality's, in every scene this reads
        self.normalizers: dict[str, Normalizer] | None = None  # from a checkpoint, else fitted on load
        self.label_maps: dict[str, np.ndarray] | None = None  # None: a scene to predict only
        self._init_training_options(pad_mode, augment)
        if unlabelled:
            return

        self._labels_digest = _digest(maps)
        self.guard_removed: np.ndarray | None = None  # per class: test pixels the per-class guard band removed
        self.label_maps = self._split(maps, train_per_class, val_fraction, test_fraction, split_block_size,
                                      patch_size // 2 if guard is None else guard, seed)
        self._check_splits(self.label_maps, train_labels or labels, test_labels or labels, fixed_k is not None)

    def _probe_layout(self, label_paths: list[str]) -> None:
        """Band counts, grid ratios, the reference grid and its georeferencing, from headers only."""
        headers = {name: read_header(p) for name, p in self.modalities.items()}
        self._bands = {name: h.bands for name, h in headers.items()}
        self.ratios = grid_ratios(headers)
        self.reference, source = borrow_georeferencing(reference_header(headers), headers, self.ratios,
                                                       [read_header(p) for p in label_paths if is_gdal_raster(p)])
        if source is not None:
            rank_zero_info(f"{self.reference.path} has no georeferencing: maps take the transform "
                           f"{'and CRS ' if self.reference.crs else '(no CRS) '}of {source}")
        self.shape = self.reference.shape
        if max(self.shape) < self.patch_size:
            raise InputError(f"patch_size {self.patch_size} is larger than the scene {self.shape} of "
                             f"{self.reference.path}")

    def _init_training_options(self, pad_mode: str, augment: Augment | None) -> None:
        if pad_mode not in ("reflect", "zero"):
            raise InputError(f"pad_mode must be reflect or zero, got {pad_mode!r}")
        augmenter = BatchAugmenter(augment, list(self.modalities))
        self.augmenter = augmenter if augmenter.active else None

    def _read_label_maps(self, paths: dict[str, str | None], label_map: dict[int, int] | None,
                         label_nodata: int | None, class_map: str | None,
                         coordinate_base: int) -> dict[str, np.ndarray]:
        """Read every given label map (or coordinate list into ``class_map``); ``label_map`` renumbers
        the classes before anything else."""
        fixed_k = len(self.class_names) if self.class_names else None
        if label_map and fixed_k is not None and max(label_map.values()) != fixed_k:
            raise InputError(f"label_map maps to classes 1..{max(label_map.values())} but class_names names "
                             f"{fixed_k}: give one name per new class")
        check_k = None if label_map else fixed_k
        coordinates_into = class_map and ClassMap.read(self.reference, class_map, check_k, label_nodata,
                                                       coordinate_base)
        maps = {}
        for split, path in paths.items():
            if path is None:
                continue
            values = read_split_labels(self.reference, path, check_k, label_nodata, coordinates_into)
            if label_map:
                values = remap_labels(values, label_map, path)
            maps[split] = values.astype(np.int16 if values.max() < 2 ** 15 else np.int32)
        return maps

    def _split(self, maps: dict[str, np.ndarray], train_per_class, val_fraction: float, test_fraction: float,
               block_size: int, guard: int, seed: int) -> dict[str, np.ndarray]:
        """train/val/test maps from the given ones by the configured protocol (see the class docstring)."""
        if not 0 <= val_fraction < 1:
            raise InputError(f"val_fraction must be in [0, 1) (0 = no validation set), got {val_fraction}")
        maps = dict(maps)
        if train_per_class is not None:
            check_per_class(train_per_class)
        if "all" in maps and train_per_class is not None:
            maps["train"], maps["test"], removed = per_class_split(maps["all"], train_per_class, seed, guard)
            self._log_per_class(maps["train"], removed, train_per_class, seed, guard)
        elif "all" in maps:
            if not 0 < test_fraction < 1:
                raise InputError(f"test_fraction must be in (0, 1), got {test_fraction}")
            everything = maps["all"]  # kept: the split card counts it
            maps["train"], maps["test"] = block_split(everything, test_fraction, block_size, seed, guard)
            dropped = int((everything > 0).sum() - (maps["train"] > 0).sum() - (maps["test"] > 0).sum())
            rank_zero_info(f"Block split (seed {seed}): the guard band of {guard} px removed {dropped} training "
                           "pixels around the test blocks")
        elif train_per_class is not None:  # official maps: subsample the training map, keep the official test set
            maps["train"] = sample_per_class(maps["train"], train_per_class, seed, keep_test=False)
            self._log_per_class(maps["train"], None, train_per_class, seed, guard)
        if "val" not in maps and val_fraction > 0:
            maps["train"], maps["val"] = block_split(maps["train"], val_fraction, block_size, seed + 1)
        return maps

    def _log_per_class(self, train: np.ndarray, removed: np.ndarray | None, per_class, seed: int, guard: int) -> None:
        counts = np.bincount(train.ravel(), minlength=self.num_classes + 1)[1:]
        summary = ", ".join(f"{name} {n}" for name, n in zip(self.class_names, counts))
        rank_zero_info(f"Per-class sampling (train_per_class {per_class}, seed {seed}): training pixels {summary}")
        if removed is None:
            return
        self.guard_removed = np.bincount(removed.ravel(), minlength=self.num_classes + 1)[1:]
        detail = ", ".join(f"{name} {n}" for name, n in zip(self.class_names, self.guard_removed) if n)
        rank_zero_info(f"Guard band of {guard} px around the training pixels removed {int(self.guard_removed.sum())} "
                       f"test pixels{f' ({detail})' if detail else ''}")

    def _check_splits(self, maps, train_path, test_path, configured: bool) -> None:
        for split in ("train", "val", "test"):
            if split in maps and not (maps[split] > 0).any():
                raise RasterError(f"{train_path if split != 'test' else test_path}: the {split} set is empty")
        val_path = self.hparams.val_labels or train_path
        for first, path in (("train", train_path), ("val", val_path)):  # selecting on test pixels is leakage too
            both = (maps[first] > 0) & (maps["test"] > 0) if first in maps else None
            if both is not None and both.any():
                r, c = np.argwhere(both)[0]
                raise RasterError(f"{path} and {test_path}: {int(both.sum())} pixels are labelled in both "
                                  f"{first} and test (first at row {r}, col {c})")
        counts = np.bincount(maps["train"].ravel(), minlength=self.num_classes + 1)[1:]
        for k in np.flatnonzero(counts == 0):
            message = f"{train_path}: class {k + 1} ({self.class_names[k]}) has no training pixel"
            if configured:
                raise RasterError(message)
            rank_zero_warn(message)

    @property
    def has_validation(self) -> bool:
        """False with ``val_fraction: 0`` and no ``val_labels``: no validation loop, the last epoch is kept."""
        return self.label_maps is not None and "val" in self.label_maps

    @property
    def in_channels(self) -> dict[str, int]:
        """Bands each modality feeds the model (after PCA, if any)."""
        pca = self.hparams.pca or {}
        return {name: pca.get(name, bands) for name, bands in self._bands.items()}

    @property
    def dense(self) -> bool:
        return self.sampling == "tile"

    def _pixels(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        labels = self.label_maps[split]
        keep = (labels > 0) & self.scene.valid
        dropped = int(((labels > 0) & ~self.scene.valid).sum())
        if dropped:
            rank_zero_warn(f"{dropped} {split} pixels fall on nodata/NaN and are not used")
        rows, cols = np.nonzero(keep)
        return rows, cols, labels[rows, cols] - 1

    def _tile_labels(self, split: str) -> np.ndarray:
        labels = self.label_maps[split]
        return np.where((labels > 0) & self.scene.valid, labels - 1, IGNORE_INDEX)

    def load(self) -> Scene:
        """Read and normalise the scene once (the expensive part, kept out of ``__init__``)."""
        if self.scene is None:
            hp = self.hparams
            self.scene = load_scene(self.modalities, pad=self.patch_size, normalization=hp.normalization,
                                    normalization_overrides=hp.normalization_overrides,
                                    clip_percentile=hp.clip_percentile, fit_mask=self._fit_mask(), pca=hp.pca,
                                    nodata=hp.nodata, pad_mode=hp.pad_mode, seed=hp.seed)
            self.normalizers = self.scene.normalizers
            for name, cube in self.extra_modalities.items():
                self.scene.add(name, _array(cube))
        return self.scene

    def add_modality(self, name: str, cube: np.ndarray | str) -> None:
        """One more modality of every sample: a (C, H, W) cube on the reference grid that needs no
        normalisation (BDGF's feature bank), or the path of a ``.npy`` file of one, which windowed
        prediction reads window by window (memory-mapped)."""
        if self.scene is not None:
            self.scene.add(name, _array(cube))
        self.extra_modalities[name] = cube

    def _fit_mask(self) -> np.ndarray | None:
        if self.hparams.normalize_on != "train":
            return None
        if self.label_maps is None:
            raise InputError(f"{self.reference.path}: normalize_on: train needs training labels or the statistics "
                             "of a checkpoint (--ckpt_path)")
        return self.label_maps["train"] > 0

    def state_dict(self) -> dict:
        """The fitted normalisation goes into checkpoints, so prediction normalises as training did; what a
        new scene must look like (``lightning predict --ckpt_path``); and the split's fingerprint, so a
        checkpoint is never tested on another split of the same labels."""
        state = {}
        if self.label_maps is not None:
            state["split"] = {"seed": int(self.hparams.seed), "labels": self._labels_digest,
                              "split": _digest(self.label_maps)}
        if self.normalizers is not None:
            # tensors, not numpy arrays: checkpoints are loaded with torch.load(weights_only=True)
            state["normalizers"] = {name: {k: torch.from_numpy(np.array(v)) for k, v in n.state().items()}
                                    for name, n in self.normalizers.items()}
            state["input"] = input_options(self)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        split = state_dict.get("split")
        predicting = self.trainer is not None and self.trainer.predicting  # a map does not use the split
        if split and not predicting and self.label_maps is not None and split["labels"] == self._labels_digest \
                and split["split"] != _digest(self.label_maps):
            raise InputError(f"{self.hparams.labels or self.hparams.train_labels}: the checkpoint was trained on "
                             f"another split of these labels (split seed {split['seed']}, here {self.hparams.seed}): "
                             f"its test pixels would not be the ones held out; pass --data.init_args.seed "
                             f"{split['seed']} (or the run's --seed_everything)")
        if "normalizers" not in state_dict:
            return
        saved = {name: Normalizer.from_state({k: np.asarray(v) for k, v in s.items()})
                 for name, s in state_dict["normalizers"].items()}
        check_modalities({name: len(n.stats.offset) for name, n in saved.items()}, self._bands, self.modalities,
                         "the checkpoint's normalisation")
        if self.scene is not None:  # already normalised with its own statistics: say if they differ
            for name, normalizer in saved.items():
                if not _same_normalizer(normalizer, self.scene.normalizers.get(name)):
                    rank_zero_warn(f"{self.modalities.get(name, name)}: normalisation statistics differ from the "
                                   "checkpoint's (another scene?); this scene is normalised with its own")
            return
        self.normalizers = saved

    def setup(self, stage: str | None = None) -> None:
        if self.label_maps is None and stage != "predict":
            raise InputError(f"{getattr(stage, 'value', stage) or 'setup'} needs label maps: give train_labels "
                             "and test_labels (or labels); "
                             f"{', '.join(self.modalities.values())} without labels can only be predicted")
        if stage == "predict" and (self.hparams.predict_window or (self.scene is None and self.trainer is not None)):
            return  # read when prediction starts, after the checkpoint's normalisation is restored
        self.load()
        if stage in (None, "fit"):
            self.train_dataset = self._unlabelled_tiles() if self.hparams.pretrain_tiles else self._dataset("train")
            self.val_dataset = self._dataset("val") if self.has_validation else None
            self.leakage = pixels_inside_patches(self.label_maps["train"], self.label_maps["test"], self.patch_size)
            total = int((self.label_maps["test"] > 0).sum())
            rank_zero_info(f"Leakage check: {self.leakage} of {total} test pixels ({100 * self.leakage / total:.1f}%) "
                           f"lie inside a training patch of size {self.patch_size}")
        if stage == "validate" and not self.has_validation:
            raise InputError(f"{self.hparams.train_labels or self.hparams.labels}: no validation set "
                             "(val_fraction is 0 and no val_labels): nothing to validate")
        if stage in (None, "validate") and self.has_validation:
            self.val_dataset = self._dataset("val")
        if stage in (None, "test"):
            self.test_dataset = self._dataset("test")
        if stage in (None, "predict"):
            self.predict_dataset = self._predict_dataset()

    def _unlabelled_tiles(self):
        options = dict(self.hparams.pretrain_tiles)
        if set(options) != {"tile", "per_epoch"}:
            raise InputError(f"pretrain_tiles: expected the keys tile and per_epoch, got {sorted(options)}")
        return RandomSceneTiles.of_scene(self.scene, list(self.in_channels), int(options["tile"]),
                                         int(options["per_epoch"]))

    def _dataset(self, split: str):
        if self.sampling == "pixel":
            rows, cols, labels = self._pixels(split)
            # an even patch's pixel is off-centre: cut it one larger so that flips and rotations pivot on it
            turned = split == "train" and self.augmenter is not None and self.augmenter.geometric
            extra = int(turned and self.patch_size % 2 == 0)
            return PixelPatchDataset(self.scene, rows, cols, self.patch_size, labels, extra)
        labels = self._tile_labels(split)
        tile = self.patch_size
        if split == "train":
            origins, keep = strided_tiles(self.shape, tile, self.train_stride), None
        else:
            origins, keep = covering_tiles(self.shape, tile)
        dataset = TileDataset(self.scene, origins, tile, labels, keep)
        has_label = dataset.labelled()
        return TileDataset(self.scene, origins[has_label], tile, labels, None if keep is None else keep[has_label])

    def _predict_dataset(self):
        if self.hparams.predict_window:
            return self._windowed_predict_dataset()
        if self.sampling == "pixel":
            rows, cols = np.nonzero(self.scene.valid)
            return PixelPatchDataset(self.scene, rows, cols, self.patch_size)
        origins, keep = covering_tiles(self.shape, self.patch_size)
        return TileDataset(self.scene, origins, self.patch_size, None, keep)

    def _windowed_predict_dataset(self) -> WindowedPredictDataset:
        hp = self.hparams
        source = SceneSource(self.modalities, self.ratios, self.shape, hp.nodata or {}, hp.pad_mode,
                             self.extra_modalities)
        normalizers = self.normalizers
        if normalizers is None:
            rank_zero_info("Fitting normalisation statistics window by window (no checkpoint statistics)")
            modes = {name: (hp.normalization_overrides or {}).get(name, hp.normalization) for name in self.modalities}
            normalizers = fit_normalizers(source.read, grid_windows(self.shape, hp.predict_window), self.shape,
                                          self.ratios, self.modalities, modes, hp.clip_percentile, self._fit_mask(),
                                          hp.pca, hp.seed)
            self.normalizers = normalizers
        return WindowedPredictDataset(source, normalizers, self.sampling, self.patch_size, hp.predict_window)

    def _loader(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        # The training order depends on (data seed, epoch) only, so resumed runs match exactly.
        # Under DDP, evaluation splits the samples without repeating any (exact synchronised metrics);
        # prediction is split by Lightning the same way.
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        if shuffle and self.hparams.balanced_sampling:
            sampler = ClassBalancedSampler(balanced_classes(dataset), self.hparams.seed, world, rank)
        elif shuffle:
            sampler = EpochShuffleSampler(len(dataset), self.hparams.seed, world, rank)
        elif world > 1:
            if len(dataset) < world:  # a process without samples would skip the metric synchronisation: a hang
                raise InputError(f"{self.reference.path}: an evaluation set has {len(dataset)} samples, fewer than "
                                 f"the {world} processes; run it on fewer devices")
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        else:
            sampler = None
        per_rank = len(sampler) if sampler is not None else len(dataset)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=collate, persistent_workers=self.num_workers > 0,
                          drop_last=shuffle and per_rank % batch_size == 1)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, self.batch_size, shuffle=True)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Augments training batches on their device; the draws depend on (seed, epoch, rank, batch index)."""
        trainer = self.trainer
        if self.augmenter is None or trainer is None or not trainer.training:
            return batch
        batch_idx = trainer.fit_loop.epoch_loop.batch_idx + 1  # the batch_idx training_step receives
        device = next(iter(batch.values())).device
        generator = batch_generator(self.hparams.seed, trainer.current_epoch, trainer.global_rank, batch_idx, device)
        extra = getattr(self.train_dataset, "extra", 0)
        return self.augmenter(batch, generator, extra, getattr(self.train_dataset, "size", 0))

    def val_dataloader(self) -> DataLoader | list:
        if not self.has_validation:
            return []  # Lightning skips the validation loop (val_fraction: 0 without val_labels)
        return self._loader(self.val_dataset, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        if self.scene is None and not self.hparams.predict_window and self.normalizers is not None:
            # normalised with the checkpoint's statistics: the model sees this scene as it saw its training scene
            source = SceneSource(self.modalities, self.ratios, self.shape, self.hparams.nodata or {},
                                 self.hparams.pad_mode, self.extra_modalities)
            self.scene = source.scene((0, self.shape[0], 0, self.shape[1]), self.patch_size, self.normalizers)
        elif self.scene is None and not self.hparams.predict_window:
            self.load()
        if self.hparams.predict_window or not hasattr(self, "predict_dataset"):
            self.predict_dataset = self._predict_dataset()
        return DataLoader(self.predict_dataset, batch_size=self.eval_batch_size, num_workers=self.num_workers,
                          collate_fn=collate)


def _array(cube: np.ndarray | str) -> np.ndarray:
    return cube if isinstance(cube, np.ndarray) else np.load(cube, mmap_mode="r")
