"""Patch and tile datasets cut on the fly from a :class:`~rsfusion.datamodules.scene.Scene`.

Both datasets fetch whole batches at once (``__getitems__``): one vectorised gather per modality
instead of one slice per sample, so the data pipeline stays far ahead of the models on a CPU.
"""
from __future__ import annotations

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torch.utils.data import Dataset, DistributedSampler, default_collate

from rsfusion.datamodules.scene import Scene

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

    Under DDP each of ``num_replicas`` processes takes every ``num_replicas``-th index of the same
    permutation (padded by wrapping around so all ranks run the same number of steps). It is a
    ``DistributedSampler``, so Lightning keeps it and calls :meth:`set_epoch` every epoch.
    """

    def __init__(self, length: int, seed: int, num_replicas: int = 1, rank: int = 0):
        self.length, self.seed, self.epoch = length, seed, 0
        self.num_replicas, self.rank = num_replicas, rank
        self.num_samples = -(-length // num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.shuffle, self.drop_last = True, False  # what code inspecting a DistributedSampler reads

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2 ** 63)
        order = torch.randperm(self.length, generator=generator)
        if self.total_size > self.length:
            order = order.repeat(-(-self.total_size // self.length))[:self.total_size]
        return iter(order[self.rank::self.num_replicas].tolist())


def collate(batch):
    """Batches fetched by ``__getitems__`` arrive already stacked."""
    return batch if isinstance(batch, dict) else default_collate(batch)


class PixelPatchDataset(Dataset):
    """One sample per pixel: a ``patch_size`` window around it in every modality (``pixel`` sampling).

    The pixel sits at index (p-1)//2 of its patch (the centre for odd p; for even p the convention of
    the MS/PAN literature, e.g. index 7 of 16). A modality at r times the reference resolution gives a
    (p r) x (p r) patch over the same ground. Samples: ``{modality: (C, p r, p r), "label": class
    index (0-based)}``; without labels (prediction) ``"index"`` holds the pixel's (row, col).
    """

    def __init__(self, scene: Scene, rows: np.ndarray, cols: np.ndarray, patch_size: int,
                 labels: np.ndarray | None = None):
        if scene.pad < patch_size:
            raise ValueError(f"scene padding {scene.pad} is smaller than patch_size {patch_size}")
        self.rows, self.cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.offset = scene.pad - (patch_size - 1) // 2
        self.scene, self.size = scene, patch_size

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


def grid_origins(length: int, tile: int, stride: int) -> np.ndarray:
    """Tile starts at ``stride`` steps, plus a last tile flush with the end, so every index is covered."""
    if length <= tile:
        return np.zeros(1, dtype=np.int64)
    starts = np.arange(0, length - tile + 1, stride)
    if starts[-1] + tile < length:
        starts = np.append(starts, length - tile)
    return starts.astype(np.int64)


def covering_tiles(shape: tuple[int, int], tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Tiles covering every pixel exactly once: (origins (n, 2), first owned local row/col (n, 2)).

    Tiles sit on a ``tile`` grid; the last row/column of tiles is shifted flush with the image edge
    and owns only the pixels the previous tile did not (the authors' tiling dropped those edges).
    """
    out_origin, out_keep = [], []
    per_axis = []
    for length in shape:
        starts = grid_origins(length, tile, tile)
        keep = np.zeros_like(starts)
        if len(starts) > 1:
            keep[-1] = starts[-2] + tile - starts[-1]
        per_axis.append((starts, keep))
    for y, ky in zip(*per_axis[0]):
        for x, kx in zip(*per_axis[1]):
            out_origin.append((y, x))
            out_keep.append((ky, kx))
    origins = np.array(out_origin, dtype=np.int64).reshape(-1, 2)
    keep = np.array(out_keep, dtype=np.int64).reshape(-1, 2)
    return origins, keep


class TileDataset(Dataset):
    """Dense ``tile`` x ``tile`` windows with their whole label tile as target (``tile`` sampling).

    ``labels`` is the (H, W) map of 0-based classes with :data:`IGNORE_INDEX` for unlabelled pixels;
    pixels outside the image or before ``keep`` (owned by another tile) are ignored too, so each
    labelled pixel is counted once when tiles come from :func:`covering_tiles`. Without labels
    (prediction) samples carry ``"origin"`` and the owned-pixel mask ``"owned"``.
    """

    def __init__(self, scene: Scene, origins: np.ndarray, tile: int, labels: np.ndarray | None = None,
                 keep: np.ndarray | None = None):
        if scene.pad < tile:
            raise ValueError(f"scene padding {scene.pad} is smaller than the tile size {tile}")
        self.origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
        self.keep = np.zeros_like(self.origins) if keep is None else np.asarray(keep, dtype=np.int64)
        self.tile, self.pad = tile, scene.pad
        self.scene = scene
        h, w = scene.shape
        # Owned-pixel masks need the image border: pixels beyond it belong to no tile.
        inside = np.zeros((h + 2 * tile, w + 2 * tile), dtype=bool)
        inside[tile:tile + h, tile:tile + w] = scene.valid
        self.inside = sliding_window_view(inside, (tile, tile))
        if labels is not None:
            padded = np.full((h + 2 * tile, w + 2 * tile), IGNORE_INDEX, dtype=np.int64)
            padded[tile:tile + h, tile:tile + w] = labels
            self.labels = sliding_window_view(padded, (tile, tile))
        else:
            self.labels = None

    def __len__(self) -> int:
        return len(self.origins)

    def _owned(self, idx: np.ndarray) -> np.ndarray:
        y, x = self.origins[idx, 0], self.origins[idx, 1]
        owned = self.inside[y + self.tile, x + self.tile].copy()
        local = np.arange(self.tile)
        owned &= (local[None, :, None] >= self.keep[idx, 0, None, None])
        owned &= (local[None, None, :] >= self.keep[idx, 1, None, None])
        return owned

    def labelled(self) -> np.ndarray:
        """Which tiles own at least one labelled pixel."""
        out = np.zeros(len(self), dtype=bool)
        for idx in np.array_split(np.arange(len(self)), max(1, len(self) // 1024)):
            y, x = self.origins[idx, 0], self.origins[idx, 1]
            out[idx] = ((self.labels[y + self.tile, x + self.tile] >= 0) & self._owned(idx)).any(axis=(1, 2))
        return out

    def __getitems__(self, indices) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        y, x = self.origins[idx, 0], self.origins[idx, 1]
        batch = _gather(_windows(self.scene, self.tile), y + self.pad, x + self.pad)
        owned = self._owned(idx)
        if self.labels is not None:
            target = np.where(owned, self.labels[y + self.tile, x + self.tile], IGNORE_INDEX)
            batch["label"] = torch.from_numpy(target)
        else:
            batch["origin"] = torch.from_numpy(self.origins[idx])
            batch["owned"] = torch.from_numpy(owned)
        return batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}
