"""Patch and tile datasets cut on the fly from a :class:`~rsfusion.datamodules.scene.Scene`, and their loaders.

Both datasets fetch whole batches at once (``__getitems__``): one vectorised gather per modality
instead of one slice per sample, so the data pipeline stays far ahead of the models on a CPU.
"""
from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_warn
from numpy.lib.stride_tricks import sliding_window_view
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from rsfusion.datamodules.errors import InputError
from rsfusion.datamodules.scene import Scene
from rsfusion.datamodules.tiling import covering_tiles, strided_tiles

IGNORE_INDEX = -1


def _windows(scene: Scene, size: int) -> dict[str, np.ndarray]:
    """Zero-copy views (C, Y, X, size r, size r) whose [:, y, x] is the window at padded (y, x)."""
    views = {}
    for name, arr in scene.data.items():
        r = scene.ratios[name]
        view = sliding_window_view(arr, (size * r, size * r), axis=(1, 2))
        views[name] = view[:, ::r, ::r]
    return views


def _gather(views: dict[str, np.ndarray], y: np.ndarray, x: np.ndarray) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.ascontiguousarray(np.moveaxis(view[:, y, x], 0, 1)))
            for name, view in views.items()}


class EpochShuffleSampler(DistributedSampler):
    """A shuffled order that depends only on (seed, epoch), so a resumed run sees the same batches.

    A :class:`~torch.utils.data.DistributedSampler` over ``length`` samples (``shuffle`` is always on):
    Lightning keeps it under DDP and calls :meth:`set_epoch` every epoch. Each of ``num_replicas``
    processes takes every ``num_replicas``-th index of the same permutation; the permutation is padded
    by wrapping around so all ranks run ``len(self)`` steps, or with ``drop_last`` cut to a multiple
    of ``num_replicas``. ``num_replicas``/``rank`` default to the initialised process group's (else
    1 and 0), as in ``DistributedSampler``.
    """

    def __init__(self, length: int, seed: int, num_replicas: int | None = None, rank: int | None = None,
                 drop_last: bool = False):
        if num_replicas is None or rank is None:
            group = torch.distributed.is_available() and torch.distributed.is_initialized()
            if num_replicas is None:
                num_replicas = torch.distributed.get_world_size() if group else 1
            rank = (torch.distributed.get_rank() if group else 0) if rank is None else rank
        super().__init__(range(length), num_replicas, rank, shuffle=True, seed=seed, drop_last=drop_last)
        self.length = length

    def _order(self, generator: torch.Generator) -> torch.Tensor:
        return torch.randperm(self.length, generator=generator)

    def __iter__(self):
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2 ** 63)
        order = self._order(generator)
        if self.total_size > self.length:
            order = order.repeat(-(-self.total_size // self.length))
        return iter(order[:self.total_size][self.rank::self.num_replicas].tolist())


class ClassBalancedSampler(EpochShuffleSampler):
    """Draws as many samples per epoch as there are, with replacement, each with probability inversely
    proportional to the size of its class: every class is drawn equally often on average.

    ``classes`` gives each sample's class (see :func:`balanced_classes`). Draws depend only on (seed,
    epoch) and are split across DDP ranks like :class:`EpochShuffleSampler` (rank k takes every
    ``num_replicas``-th draw of the same sequence).
    """

    def __init__(self, classes: np.ndarray, seed: int, num_replicas: int | None = None, rank: int | None = None,
                 drop_last: bool = False):
        classes = np.asarray(classes)
        super().__init__(len(classes), seed, num_replicas, rank, drop_last)
        order = np.argsort(classes, kind="stable")
        _, counts = np.unique(classes, return_counts=True)
        self.members = torch.from_numpy(order)
        self.counts = torch.from_numpy(counts)
        self.starts = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)[:-1]]))

    def _order(self, generator: torch.Generator) -> torch.Tensor:
        # P(sample i) = 1 / (K n_class(i)), drawn as a uniform class, then a uniform member of it
        # (exact, and unlike torch.multinomial not limited to 2^24 samples)
        which = torch.randint(len(self.counts), (self.length,), generator=generator)
        member = (torch.rand(self.length, generator=generator, dtype=torch.float64) * self.counts[which]).long()
        member = torch.minimum(member, self.counts[which] - 1)
        return self.members[self.starts[which] + member]


def collate(batch):
    """Batches fetched by ``__getitems__`` arrive already stacked."""
    return batch if isinstance(batch, dict) else default_collate(batch)


class PixelPatchDataset(Dataset):
    """One sample per pixel: a ``patch_size`` window around it in every modality (``pixel`` sampling).

    The pixel sits at index (p-1)//2 of its patch (the centre for odd p; for even p the convention of
    the MS/PAN literature, e.g. index 7 of 16). A modality at r times the reference resolution gives a
    (p r) x (p r) patch over the same ground. Samples: ``{modality: (C, p r, p r), "label": class
    index (0-based)}``; without labels (prediction) ``"index"`` holds the pixel's (row, col).

    ``extra`` > 0 cuts patches that many pixels larger at the top and left: an even patch cut with
    ``extra=1`` is odd and centred on its pixel, so flips and rotations pivot on it (see
    :class:`~rsfusion.datamodules.augment.BatchAugmenter`, which crops the border off again).
    """

    def __init__(self, scene: Scene, rows: np.ndarray, cols: np.ndarray, patch_size: int,
                 labels: np.ndarray | None = None, extra: int = 0):
        before, after = (patch_size - 1) // 2 + extra, patch_size // 2  # pixels the patch reaches past its pixel
        if scene.pad < max(before, after):
            raise ValueError(f"scene padding {scene.pad} is too small for patch_size {patch_size} (extra {extra})")
        self.rows, self.cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.offset = scene.pad - (patch_size - 1) // 2 - extra
        self.scene, self.size, self.extra = scene, patch_size + extra, extra

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        rows, cols = self.rows[idx], self.cols[idx]
        # views are O(1) to make, and modalities may be added to the scene later (feature banks)
        batch = _gather(_windows(self.scene, self.size), rows + self.offset, cols + self.offset)
        if self.labels is not None:
            batch["label"] = torch.from_numpy(self.labels[idx])
        else:
            batch["index"] = torch.from_numpy(np.stack([rows, cols], axis=1))
        return batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


class TileDataset(Dataset):
    """Dense ``tile`` x ``tile`` windows with their whole label tile as target (``tile`` sampling).

    ``labels`` is the (H, W) map of 0-based classes with :data:`IGNORE_INDEX` for unlabelled pixels;
    pixels outside the image or before ``keep`` (owned by another tile) are ignored too, so each
    labelled pixel is counted once when tiles come from :func:`~rsfusion.datamodules.tiling.covering_tiles`. Without
    labels
    (prediction) samples carry ``"origin"`` and the owned-pixel mask ``"owned"``.
    """

    def __init__(self, scene: Scene, origins: np.ndarray, patch_size: int, labels: np.ndarray | None = None,
                 keep: np.ndarray | None = None):
        if scene.pad < patch_size:
            raise ValueError(f"scene padding {scene.pad} is smaller than the patch_size size {patch_size}")
        self.origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
        self.keep = np.zeros_like(self.origins) if keep is None else np.asarray(keep, dtype=np.int64)
        self.patch_size, self.pad = patch_size, scene.pad
        self.scene = scene
        h, w = scene.shape
        # Owned-pixel masks need the image border: pixels beyond it belong to no patch_size.
        inside = np.zeros((h + 2 * patch_size, w + 2 * patch_size), dtype=bool)
        inside[patch_size:patch_size + h, patch_size:patch_size + w] = scene.valid
        self.inside = sliding_window_view(inside, (patch_size, patch_size))
        if labels is not None:
            padded = np.full((h + 2 * patch_size, w + 2 * patch_size), IGNORE_INDEX, dtype=np.int64)
            padded[patch_size:patch_size + h, patch_size:patch_size + w] = labels
            self.labels = sliding_window_view(padded, (patch_size, patch_size))
            self.class_pixels = np.bincount(labels[labels >= 0].ravel())  # labelled pixels per class
        else:
            self.labels = None

    def __len__(self) -> int:
        return len(self.origins)

    def _owned(self, idx: np.ndarray) -> np.ndarray:
        y, x = self.origins[idx, 0], self.origins[idx, 1]
        owned = self.inside[y + self.patch_size, x + self.patch_size].copy()
        local = np.arange(self.patch_size)
        owned &= (local[None, :, None] >= self.keep[idx, 0, None, None])
        owned &= (local[None, None, :] >= self.keep[idx, 1, None, None])
        return owned

    def labelled(self) -> np.ndarray:
        """Which tiles own at least one labelled pixel."""
        out = np.zeros(len(self), dtype=bool)
        for idx in np.array_split(np.arange(len(self)), max(1, len(self) // 1024)):
            y, x = self.origins[idx, 0], self.origins[idx, 1]
            p = self.patch_size
            out[idx] = ((self.labels[y + p, x + p] >= 0) & self._owned(idx)).any(axis=(1, 2))
        return out

    def rarest_classes(self) -> np.ndarray:
        """Each tile's rarest class: of the labelled pixels it owns, the class with the fewest labelled
        pixels in the whole map (ties: the lower class); -1 for a tile without labelled pixels."""
        k = len(self.class_pixels)
        by_rarity = np.lexsort((np.arange(k), self.class_pixels))  # classes, rarest first
        rarity = np.empty(k, dtype=np.int64)
        rarity[by_rarity] = np.arange(k)  # class -> rank
        none = k
        out = np.empty(len(self), dtype=np.int64)
        for idx in np.array_split(np.arange(len(self)), max(1, len(self) // 1024)):
            y, x = self.origins[idx, 0], self.origins[idx, 1]
            labels = np.where(self._owned(idx), self.labels[y + self.patch_size, x + self.patch_size], IGNORE_INDEX)
            ranks = np.where(labels >= 0, rarity[np.maximum(labels, 0)], none).min(axis=(1, 2))
            out[idx] = np.where(ranks < none, by_rarity[np.minimum(ranks, none - 1)], IGNORE_INDEX)
        return out

    def __getitems__(self, indices) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        y, x = self.origins[idx, 0], self.origins[idx, 1]
        batch = _gather(_windows(self.scene, self.patch_size), y + self.pad, x + self.pad)
        owned = self._owned(idx)
        if self.labels is not None:
            target = np.where(owned, self.labels[y + self.patch_size, x + self.patch_size], IGNORE_INDEX)
            batch["label"] = torch.from_numpy(target)
        else:
            batch["origin"] = torch.from_numpy(self.origins[idx])
            batch["owned"] = torch.from_numpy(owned)
        return batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def balanced_classes(dataset: Dataset) -> np.ndarray:
    """The class each training sample counts as for :class:`ClassBalancedSampler`: a pixel sample's own
    class, a tile's rarest labelled class (:meth:`TileDataset.rarest_classes`)."""
    if isinstance(dataset, PixelPatchDataset) and dataset.labels is not None:
        return dataset.labels
    if isinstance(dataset, TileDataset) and dataset.labels is not None:
        return dataset.rarest_classes()
    raise InputError(f"balanced_sampling needs labelled pixel or tile samples; the training set is a "
                     f"{type(dataset).__name__}")


def labelled_dataset(scene: Scene, labels: np.ndarray, split: str, sampling: str, patch_size: int,
                     train_stride: int, extra: int = 0) -> Dataset:
    """The samples of one split's label raster: a patch per labelled valid pixel (``pixel``; ``extra``
    pixels more on each side, for augmentation) or the tiles holding labelled pixels (``tile``: strided
    for training, a covering grid for evaluation)."""
    valid = (labels > 0) & scene.valid
    if sampling == "pixel":
        dropped = int(((labels > 0) & ~scene.valid).sum())
        if dropped:
            rank_zero_warn(f"{dropped} {split} pixels fall on nodata/NaN and are not used")
        rows, cols = np.nonzero(valid)
        return PixelPatchDataset(scene, rows, cols, patch_size, labels[rows, cols] - 1, extra)
    targets = np.where(valid, labels - 1, IGNORE_INDEX)
    if split == "train":
        origins, keep = strided_tiles(scene.shape, patch_size, train_stride), None
    else:
        origins, keep = covering_tiles(scene.shape, patch_size)
    has_label = TileDataset(scene, origins, patch_size, targets, keep).labelled()
    return TileDataset(scene, origins[has_label], patch_size, targets, None if keep is None else keep[has_label])


def prediction_dataset(scene: Scene, sampling: str, patch_size: int) -> Dataset:
    """Every valid pixel of the scene (``pixel``), or the tiles covering it (``tile``)."""
    if sampling == "pixel":
        rows, cols = np.nonzero(scene.valid)
        return PixelPatchDataset(scene, rows, cols, patch_size)
    origins, keep = covering_tiles(scene.shape, patch_size)
    return TileDataset(scene, origins, patch_size, None, keep)


def loader(dataset: Dataset, batch_size: int, shuffle: bool, *, seed: int, world: int, rank: int, balanced: bool,
           num_workers: int, where: str) -> DataLoader:
    """The DataLoader of a split. The training order depends on (data seed, epoch) only, so resumed runs match
    exactly. Under DDP, evaluation splits the samples without repeating any (exact synchronised metrics);
    prediction is split by Lightning the same way."""
    if shuffle and balanced:
        sampler = ClassBalancedSampler(balanced_classes(dataset), seed, world, rank)
    elif shuffle:
        sampler = EpochShuffleSampler(len(dataset), seed, world, rank)
    elif world > 1:
        if len(dataset) < world:  # a process without samples would skip the metric synchronisation: a hang
            raise InputError(f"{where}: an evaluation set has {len(dataset)} samples, fewer than the {world} "
                             "processes; run it on fewer devices")
        sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
    else:
        sampler = None
    per_rank = len(sampler) if sampler is not None else len(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      persistent_workers=num_workers > 0, drop_last=shuffle and per_rank % batch_size == 1)
