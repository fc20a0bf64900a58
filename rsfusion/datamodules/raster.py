"""``RasterDataModule``: any set of co-registered rasters + label maps -> patch or tile batches."""
from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Literal, get_args

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from rsfusion.datamodules.augment import Augment, BatchAugmenter, batch_generator
from rsfusion.datamodules.checkpoint_inputs import datamodule_state, restore_datamodule_state
from rsfusion.datamodules.errors import InputError
from rsfusion.datamodules.io import is_gdal_raster, read_header
from rsfusion.datamodules.label_set import SplitProtocol, read_label_set
from rsfusion.datamodules.normalization import Normalization, Normalizer, fit_normalizers
from rsfusion.datamodules.pretrain_tiles import RandomSceneTiles
from rsfusion.datamodules.sampling import (
    collate,
    labelled_dataset,
    loader,
    prediction_dataset,
)
from rsfusion.datamodules.scene import PadMode, Scene, borrow_georeferencing, grid_ratios, load_scene, reference_header
from rsfusion.datamodules.splits import (
    pixels_inside_patches,
)
from rsfusion.datamodules.tiling import grid_windows
from rsfusion.datamodules.windows import SceneSource, WindowedPredictDataset

log = logging.getLogger(__name__)

class RasterDataModule(L.LightningDataModule):
    """Co-registered rasters of several modalities with train/test (and optional val) label maps.

    Args (every option in full, with examples: docs/data.md, "RasterDataModule options"):
        modalities: modality name -> raster path (GeoTIFF, ``.npy``, ``file.mat:KEY``), in the order the
            model sees them; finer modalities at an integer ratio over the same extent (PAN at 4x MS).
        train_labels, test_labels, val_labels: label rasters on the reference grid (0 = unlabelled,
            1..K); none at all: a scene to predict only.
        labels: one label raster to divide (spatial blocks, or ``train_per_class``).
        train_per_class: N training pixels per class (a fraction when < 1).
        renumber_classes: old class value -> new class value, applied right after reading.
        seed: the data seed (splits, training order, augmentation); None: the run's seed_everything.
        class_names: names of classes 1..K (fixes K).
        palette: RGB colour of each class in maps (default: the map writer's palette).
        sampling: ``pixel`` (a patch per labelled pixel) or ``tile`` (dense tiles).
        patch_size: the side of a pixel's patch or of a tile, in reference pixels.
        train_stride: the step between training tiles (``tile`` sampling).
        batch_size, eval_batch_size, num_workers: loaders (eval default: 4 x batch_size).
        allow_even_patch: accept an even ``patch_size`` with ``pixel`` sampling.
        normalization, normalization_overrides: ``zscore``, ``minmax``, ``minmax_global`` or ``none``; per
            modality.
        normalize_on: fit the statistics on the whole ``scene`` or on ``train`` pixels only.
        clip_percentile: clip each band to [q, 100 - q] percentiles before normalising.
        pca: modality -> principal components kept (e.g. ``{"hsi": 30}``).
        nodata: modality -> nodata value overriding the file's own.
        label_nodata: a label value meaning "unlabelled" besides 0 (MUUFL: -1).
        val_fraction, test_fraction, split_block_size, guard: block splits and their guard band.
        predict_window: predict window by window (memory bounded by the window, same map).
        pad_mode: beyond the scene edge, ``reflect`` or ``zero``.
        augment: training-batch augmentation (flips, rotations, noise).
        balanced_sampling: draw training samples inversely to their class's size.
        class_raster, coordinate_base: a class raster that N x 2 coordinate lists index (base 0 or 1).
        pretrain_tiles: ``{tile: T, per_epoch: N}``: random unlabelled tiles (BDGF's DDPM).

    Still read: ``label_map``, ``class_map`` (old spellings). Steps and georeferencing: docs/data.md.
    """

    def __init__(self, modalities: dict[str, str], train_labels: str | None = None, test_labels: str | None = None,
                 val_labels: str | None = None, labels: str | None = None, class_names: list[str] | None = None,
                 palette: list[tuple[int, int, int]] | None = None, sampling: Literal["pixel", "tile"] = "pixel",
                 patch_size: int = 11, train_stride: int = 8, batch_size: int = 64,
                 eval_batch_size: int | None = None, num_workers: int = 0, normalization: Normalization = "zscore",
                 normalization_overrides: dict[str, Normalization] | None = None,
                 normalize_on: Literal["scene", "train"] = "scene", clip_percentile: float | None = None,
                 pca: dict[str, int] | None = None, nodata: dict[str, float] | None = None,
                 label_nodata: int | None = None, renumber_classes: dict[int, int] | None = None,
                 val_fraction: float = 0.1, test_fraction: float = 0.5, train_per_class: int | float | None = None,
                 split_block_size: int = 16, guard: int | None = None, seed: int | None = None,
                 allow_even_patch: bool | None = None, predict_window: int | None = None,
                 pad_mode: PadMode = "reflect", augment: Augment | None = None, balanced_sampling: bool = False,
                 class_raster: str | None = None, coordinate_base: int = 0,
                 pretrain_tiles: dict[str, int] | None = None,
                 label_map: dict[int, int] | None = None, class_map: str | None = None):
        super().__init__()
        # class names reach the model through the CLI's link; saving them here too would clash
        self.save_hyperparameters(ignore=["class_names", "palette"])
        _check_options(SimpleNamespace(**locals()))  # the arguments as given
        self.modalities = dict(modalities)
        self.sampling, self.patch_size, self.train_stride = sampling, patch_size, train_stride
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or 4 * batch_size
        self.num_workers = num_workers
        renumber_classes = _one_spelling("renumber_classes", renumber_classes, "label_map", label_map)
        class_raster = _one_spelling("class_raster", class_raster, "class_map", class_map)

        label_paths = [p for p in (train_labels, test_labels, val_labels, labels, class_raster) if p is not None]
        self._bands, self.ratios, self.reference = probe_grid(self.modalities, label_paths, patch_size)
        self.shape = self.reference.shape

        seed = 0 if seed is None else seed  # the CLI fills None with seed_everything
        self.hparams.seed = seed
        self.label_set = read_label_set(
            self.reference, {"train": train_labels, "test": test_labels, "val": val_labels, "all": labels},
            class_names, renumber_classes, label_nodata, class_raster, coordinate_base,
            SplitProtocol(train_per_class, val_fraction, test_fraction, split_block_size,
                          patch_size // 2 if guard is None else guard, seed), self.modalities)
        self.num_classes, self.class_names = self.label_set.num_classes, self.label_set.class_names
        self.palette = [tuple(c) for c in palette] if palette else None  # None: the map's default colours
        self.scene: Scene | None = None
        self.extra_modalities: dict[str, np.ndarray | str] = {}  # add_modality's, in every scene this reads
        self.normalizers: dict[str, Normalizer] | None = None  # from a checkpoint, else fitted on load
        augmenter = BatchAugmenter(augment, list(self.modalities))
        self.augmenter = augmenter if augmenter.active else None

    @property
    def label_rasters(self) -> dict[str, np.ndarray] | None:
        """The train/val/test label rasters (``label_set.rasters``; None for a scene that is only predicted)."""
        return self.label_set.rasters
    label_maps = label_rasters  # the name before issue 19

    @property
    def guard_removed(self) -> np.ndarray | None:
        return self.label_set.guard_removed

    @property
    def has_validation(self) -> bool:
        """False with ``val_fraction: 0`` and no ``val_labels``: no validation loop, the last epoch is kept."""
        return self.label_rasters is not None and "val" in self.label_rasters

    @property
    def in_channels(self) -> dict[str, int]:
        """Bands each modality feeds the model (after PCA, if any)."""
        pca = self.hparams.pca or {}
        return {name: pca.get(name, bands) for name, bands in self._bands.items()}

    @property
    def dense(self) -> bool:
        return self.sampling == "tile"

    def load(self) -> Scene:
        """The scene, read and normalised once (the expensive part, kept out of ``__init__``): with the
        checkpoint's statistics when a checkpoint gave them before the first read (prediction), else with
        statistics fitted on this scene. Every in-memory scene is made here; windowed prediction reads the
        same :meth:`scene_source` window by window."""
        if self.scene is not None:
            return self.scene
        hp = self.hparams
        if self.normalizers is not None:  # the model sees this scene as it saw its training scene
            self.scene = self.scene_source().scene((0, self.shape[0], 0, self.shape[1]), self.patch_size,
                                                   self.normalizers)
            return self.scene
        self.scene = load_scene(self.modalities, pad=self.patch_size, normalization=hp.normalization,
                                normalization_overrides=hp.normalization_overrides,
                                clip_percentile=hp.clip_percentile, fit_mask=self._fit_mask(), pca=hp.pca,
                                nodata=hp.nodata, pad_mode=hp.pad_mode, seed=hp.seed)
        self.normalizers = self.scene.normalizers
        for name, cube in self.extra_modalities.items():
            self.scene.add(name, _array(cube))
        return self.scene

    def scene_source(self) -> SceneSource:
        """The scene's files, grids and options, from which windows (or the whole scene) are read."""
        hp = self.hparams
        return SceneSource(self.modalities, self.ratios, self.shape, hp.nodata or {}, hp.pad_mode,
                           self.extra_modalities)

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
        if self.label_rasters is None:
            raise InputError(f"{self.reference.path}: normalize_on: train needs training labels or the statistics "
                             "of a checkpoint (--ckpt_path)")
        return self.label_rasters["train"] > 0

    def state_dict(self) -> dict:
        """The fitted normalisation, the input options and the split's fingerprint (:func:`datamodule_state`)."""
        return datamodule_state(self)

    def load_state_dict(self, state_dict: dict) -> None:
        restore_datamodule_state(self, state_dict)

    def setup(self, stage: str | None = None) -> None:
        if self.label_rasters is None and stage != "predict":
            raise InputError(f"{getattr(stage, 'value', stage) or 'setup'} needs label maps: give train_labels "
                             "and test_labels (or labels); "
                             f"{', '.join(self.modalities.values())} without labels can only be predicted")
        if stage == "predict" and (self.hparams.predict_window or (self.scene is None and self.trainer is not None)):
            return  # read when prediction starts, after the checkpoint's normalisation is restored
        self.load()
        if stage in (None, "fit"):
            self.train_dataset = self._unlabelled_tiles() if self.hparams.pretrain_tiles else self._dataset("train")
            self.val_dataset = self._dataset("val") if self.has_validation else None
            self.leakage = pixels_inside_patches(self.label_rasters["train"], self.label_rasters["test"],
                                                 self.patch_size)
            total = int((self.label_rasters["test"] > 0).sum())
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
        # an even pixel patch is off-centre: cut it one larger so that flips and rotations pivot on it
        turned = split == "train" and self.augmenter is not None and self.augmenter.geometric
        return labelled_dataset(self.scene, self.label_rasters[split], split, self.sampling, self.patch_size,
                                self.train_stride, extra=int(turned and self.patch_size % 2 == 0))

    def _predict_dataset(self):
        if self.hparams.predict_window:
            return self._windowed_predict_dataset()
        return prediction_dataset(self.scene, self.sampling, self.patch_size)

    def _windowed_predict_dataset(self) -> WindowedPredictDataset:
        hp = self.hparams
        source = self.scene_source()
        normalizers = self.normalizers
        if normalizers is None:
            rank_zero_info("Fitting normalisation statistics window by window (no checkpoint statistics)")
            modes = {name: (hp.normalization_overrides or {}).get(name, hp.normalization) for name in self.modalities}
            normalizers = fit_normalizers(source.read, grid_windows(self.shape, hp.predict_window), self.shape,
                                          self.ratios, self.modalities, modes, hp.clip_percentile, self._fit_mask(),
                                          hp.pca, hp.seed)
            self.normalizers = normalizers
        return WindowedPredictDataset(source, normalizers, self.sampling, self.patch_size, hp.predict_window)

    def _loader_of(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        return loader(dataset, batch_size, shuffle, seed=self.hparams.seed, world=world, rank=rank,
                      balanced=self.hparams.balanced_sampling, num_workers=self.num_workers,
                      where=self.reference.path)

    def train_dataloader(self) -> DataLoader:
        return self._loader_of(self.train_dataset, self.batch_size, shuffle=True)

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
        return self._loader_of(self.val_dataset, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader_of(self.test_dataset, self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        if not self.hparams.predict_window:
            self.load()
        if self.hparams.predict_window or not hasattr(self, "predict_dataset"):
            self.predict_dataset = self._predict_dataset()
        return DataLoader(self.predict_dataset, batch_size=self.eval_batch_size, num_workers=self.num_workers,
                          collate_fn=collate)


def _one_spelling(name: str, value, old_name: str, old_value):
    """An option given by its name or by its old spelling (still read), not both."""
    if value is not None and old_value is not None:
        raise InputError(f"{name} and {old_name} are the same option ({old_name} is its old spelling): give one")
    return old_value if value is None else value


def _array(cube: np.ndarray | str) -> np.ndarray:
    return cube if isinstance(cube, np.ndarray) else np.load(cube, mmap_mode="r")


def _check_options(hp) -> None:
    """One-line errors for options that cannot work together, before any file is read."""
    if not hp.modalities:
        raise InputError("modalities: give at least one modality name -> raster path")
    for option, value in (("batch_size", hp.batch_size), ("eval_batch_size", hp.eval_batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"{option} must be a positive number of samples, got {value!r}")
    if hp.patch_size < 1:
        raise InputError(f"patch_size must be positive, got {hp.patch_size}")
    if hp.sampling == "pixel" and hp.patch_size % 2 == 0 and not hp.allow_even_patch:
        raise InputError(f"patch_size {hp.patch_size} is even: no pixel sits at the centre of the patch; use "
                         f"{hp.patch_size + 1}, or set allow_even_patch: true "
                         f"(pixel at index {(hp.patch_size - 1) // 2})")
    if hp.predict_window is not None and hp.predict_window < 1:
        raise InputError(f"predict_window must be a positive number of pixels, got {hp.predict_window}")
    if hp.pad_mode not in get_args(PadMode):
        raise InputError(f"pad_mode must be reflect or zero, got {hp.pad_mode!r}")
    unlabelled = all(p is None for p in (hp.labels, hp.train_labels, hp.test_labels, hp.val_labels))
    if not unlabelled and ((hp.labels is None) == (hp.train_labels is None and hp.test_labels is None) or
                           (hp.labels is None and (hp.train_labels is None or hp.test_labels is None))):
        given = ", ".join(f"{k}: {v}" for k, v in (("labels", hp.labels), ("train_labels", hp.train_labels),
                                                   ("test_labels", hp.test_labels), ("val_labels", hp.val_labels))
                          if v is not None)
        raise InputError(f"label maps: give train_labels and test_labels, or a single labels map to split "
                         f"(given {given})")


def probe_grid(modalities: dict[str, str], label_paths: list[str], patch_size: int):
    """(band counts, grid ratios, the reference grid's header with its georeferencing), from headers only."""
    headers = {name: read_header(p) for name, p in modalities.items()}
    ratios = grid_ratios(headers)
    reference, source = borrow_georeferencing(reference_header(headers), headers, ratios,
                                              [read_header(p) for p in label_paths if is_gdal_raster(p)])
    if source is not None:
        rank_zero_info(f"{reference.path} has no georeferencing: maps take the transform "
                       f"{'and CRS ' if reference.crs else '(no CRS) '}of {source}")
    if max(reference.shape) < patch_size:
        raise InputError(f"patch_size {patch_size} is larger than the scene {reference.shape} of {reference.path}")
    return {name: h.bands for name, h in headers.items()}, ratios, reference
