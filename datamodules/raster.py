"""``RasterDataModule``: any set of co-registered rasters + label maps -> patch or tile batches."""
from __future__ import annotations

import logging
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader

from rsfusion.datamodules.io import InputError, RasterError, read_header, read_labels
from rsfusion.datamodules.sampling import (IGNORE_INDEX, EpochShuffleSampler, PixelPatchDataset, TileDataset, collate,
                                  covering_tiles)
from rsfusion.datamodules.scene import (Normalization, Normalizer, Scene, check_label_grid, grid_ratios, load_scene,
                              reference_header)
from rsfusion.datamodules.splits import block_split, pixels_inside_patches
from rsfusion.datamodules.windows import SceneSource, WindowedPredictDataset, fit_streaming, grid_windows

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
            ``split_block_size`` pixels.
        labels: a single label map instead of train/test maps: split into spatially disjoint blocks
            (``test_fraction`` for test), with a guard band of ``guard`` pixels (default: half a patch)
            removed from training around test blocks.
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
        val_fraction: float = 0.1,
        test_fraction: float = 0.5,
        split_block_size: int = 16,
        guard: int | None = None,
        seed: int = 0,
        allow_even_patch: bool | None = None,
        predict_window: int | None = None,
    ):
        super().__init__()
        # class names reach the model through the CLI's link; saving them here too would clash
        self.save_hyperparameters(ignore=["class_names", "palette"])
        if not modalities:
            raise ValueError("modalities: give at least one modality name -> raster path")
        if patch_size < 1:
            raise InputError(f"patch_size must be positive, got {patch_size}")
        if sampling == "pixel" and patch_size % 2 == 0 and not allow_even_patch:
            raise InputError(f"patch_size {patch_size} is even: no pixel sits at the centre of the patch; use "
                             f"{patch_size + 1}, or set allow_even_patch: true (pixel at index {(patch_size - 1) // 2})")
        if predict_window is not None and predict_window < 1:
            raise InputError(f"predict_window must be a positive number of pixels, got {predict_window}")
        if (labels is None) == (train_labels is None and test_labels is None) or \
                (labels is None and (train_labels is None or test_labels is None)):
            raise ValueError("give either train_labels and test_labels, or a single labels map to split")
        self.modalities = dict(modalities)
        self.sampling, self.patch_size, self.train_stride = sampling, patch_size, train_stride
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or 4 * batch_size
        self.num_workers = num_workers

        headers = {name: read_header(p) for name, p in self.modalities.items()}
        self._bands = {name: h.bands for name, h in headers.items()}
        self.ratios = grid_ratios(headers)
        self.reference = reference_header(headers)
        self.shape = self.reference.shape
        if max(self.shape) < patch_size:
            raise InputError(f"patch_size {patch_size} is larger than the scene {self.shape} of "
                             f"{self.reference.path}")

        self.class_names = list(class_names) if class_names else None
        fixed_k = len(self.class_names) if self.class_names else None
        maps = {}
        for split, path in (("train", train_labels), ("test", test_labels), ("val", val_labels), ("all", labels)):
            if path is not None:
                check_label_grid(self.reference, path)
                maps[split], _ = read_labels(path, fixed_k, label_nodata)
                maps[split] = maps[split].astype(np.int16 if maps[split].max() < 2 ** 15 else np.int32)
        self.num_classes = fixed_k or int(max(m.max() for m in maps.values()))
        if self.num_classes < 1:
            raise RasterError(f"{labels or train_labels}: no labelled pixel (0 = unlabelled, 1..K = classes)")
        if self.class_names is None:
            self.class_names = [f"class {k}" for k in range(1, self.num_classes + 1)]
        self.palette = [tuple(c) for c in palette] if palette else \
            [DEFAULT_PALETTE[k % len(DEFAULT_PALETTE)] for k in range(self.num_classes)]

        guard = patch_size // 2 if guard is None else guard
        if "all" in maps:
            maps["train"], maps["test"] = block_split(maps["all"], test_fraction, split_block_size, seed, guard)
        if "val" not in maps:
            maps["train"], maps["val"] = block_split(maps["train"], val_fraction, split_block_size, seed + 1)
        self._check_splits(maps, train_labels or labels, test_labels or labels, fixed_k is not None)
        self.label_maps = maps
        self.scene: Scene | None = None
        self.normalizers: dict[str, Normalizer] | None = None  # from a checkpoint, else fitted on load

    def _check_splits(self, maps, train_path, test_path, configured: bool) -> None:
        for split in ("train", "val", "test"):
            if not (maps[split] > 0).any():
                raise RasterError(f"{train_path if split != 'test' else test_path}: the {split} set is empty")
        both = (maps["train"] > 0) & (maps["test"] > 0)
        if both.any():
            r, c = np.argwhere(both)[0]
            raise RasterError(f"{train_path} and {test_path}: {int(both.sum())} pixels are labelled in both "
                              f"train and test (first at row {r}, col {c})")
        counts = np.bincount(maps["train"].ravel(), minlength=self.num_classes + 1)[1:]
        for k in np.flatnonzero(counts == 0):
            message = f"{train_path}: class {k + 1} ({self.class_names[k]}) has no training pixel"
            if configured:
                raise RasterError(message)
            rank_zero_warn(message)

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
                                    nodata=hp.nodata)
            self.normalizers = self.scene.normalizers
        return self.scene

    def _fit_mask(self) -> np.ndarray | None:
        return self.label_maps["train"] > 0 if self.hparams.normalize_on == "train" else None

    def state_dict(self) -> dict:
        """The fitted normalisation goes into checkpoints, so prediction normalises as training did."""
        if self.normalizers is None:
            return {}
        # tensors, not numpy arrays: checkpoints are loaded with torch.load(weights_only=True)
        return {"normalizers": {name: {k: torch.from_numpy(np.array(v)) for k, v in n.state().items()}
                                for name, n in self.normalizers.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        if "normalizers" not in state_dict:
            return
        saved = {name: Normalizer.from_state({k: np.asarray(v) for k, v in s.items()})
                 for name, s in state_dict["normalizers"].items()}
        if self.scene is not None:  # already normalised with its own statistics: say if they differ
            for name, normalizer in saved.items():
                if not _same_normalizer(normalizer, self.scene.normalizers.get(name)):
                    rank_zero_warn(f"{self.modalities.get(name, name)}: normalisation statistics differ from the "
                                   "checkpoint's (another scene?); this scene is normalised with its own")
            return
        self.normalizers = saved

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.hparams.predict_window:
            return  # windows are read when prediction starts, after the checkpoint's normalisation is restored
        self.load()
        if stage in (None, "fit"):
            self.train_dataset = self._dataset("train")
            self.val_dataset = self._dataset("val")
            self.leakage = pixels_inside_patches(self.label_maps["train"], self.label_maps["test"], self.patch_size)
            total = int((self.label_maps["test"] > 0).sum())
            rank_zero_info(f"Leakage check: {self.leakage} of {total} test pixels ({100 * self.leakage / total:.1f}%) "
                           f"lie inside a training patch of size {self.patch_size}")
        if stage in (None, "validate"):
            self.val_dataset = self._dataset("val")
        if stage in (None, "test"):
            self.test_dataset = self._dataset("test")
        if stage in (None, "predict"):
            self.predict_dataset = self._predict_dataset()

    def _dataset(self, split: str):
        if self.sampling == "pixel":
            rows, cols, labels = self._pixels(split)
            return PixelPatchDataset(self.scene, rows, cols, self.patch_size, labels)
        labels = self._tile_labels(split)
        tile = self.patch_size
        if split == "train":
            h, w = self.shape
            ys = np.arange(-(tile // 2), max(h - tile // 2, 1), self.train_stride)
            xs = np.arange(-(tile // 2), max(w - tile // 2, 1), self.train_stride)
            origins = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
            keep = None
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
        source = SceneSource(self.modalities, self.ratios, self.shape, hp.nodata or {})
        normalizers = self.normalizers
        if normalizers is None:
            rank_zero_info("Fitting normalisation statistics window by window (no checkpoint statistics)")
            modes = {name: (hp.normalization_overrides or {}).get(name, hp.normalization) for name in self.modalities}
            normalizers = fit_streaming(source, grid_windows(self.shape, hp.predict_window), modes,
                                        hp.clip_percentile, self._fit_mask(), hp.pca, hp.seed)
            self.normalizers = normalizers
        return WindowedPredictDataset(source, normalizers, self.sampling, self.patch_size, hp.predict_window)

    def _loader(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        # The training order depends on (global seed, epoch) only, so resumed runs match exactly.
        # Under DDP, evaluation splits the samples without repeating any (exact synchronised metrics);
        # prediction is split by Lightning the same way.
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        if shuffle:
            sampler = EpochShuffleSampler(len(dataset), torch.initial_seed(), world, rank)
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

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        if self.hparams.predict_window:
            self.predict_dataset = self._predict_dataset()
        return DataLoader(self.predict_dataset, batch_size=self.eval_batch_size, num_workers=self.num_workers,
                          collate_fn=collate)
