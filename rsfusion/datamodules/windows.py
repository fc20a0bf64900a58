"""Full-scene prediction in windows, for scenes larger than memory.

The scene is never held whole: each window (plus a halo of ``pad`` pixels) is read from disk,
normalised and cut into samples when its first sample is asked for. Windows reproduce the in-memory
scene exactly: the halo comes from the neighbouring pixels and the scene edge is padded like
:func:`~rsfusion.datamodules.scene.load_scene` (reflect or zero, ``pad_mode``). Normalisation statistics come from
the checkpoint, the loaded
scene, or :func:`~rsfusion.datamodules.normalization.fit_normalizers` fed the windows
(:meth:`SceneSource.read`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from rsfusion.datamodules.io import read_raster
from rsfusion.datamodules.normalization import Normalizer
from rsfusion.datamodules.sampling import PixelPatchDataset, TileDataset
from rsfusion.datamodules.scene import PadMode, Scene, pad_edges
from rsfusion.datamodules.tiling import Window, coarse_valid, covering_tiles, grid_windows


@dataclass
class SceneSource:
    """Where a scene's modalities live on disk and how their grids relate (no pixels held)."""

    paths: Mapping[str, str]
    ratios: Mapping[str, int]
    shape: tuple[int, int]
    nodata: Mapping[str, float]
    pad_mode: PadMode = "reflect"
    # modalities that are already normalised (C, H, W) arrays on the reference grid, or .npy files of them
    # (memory-mapped): e.g. BDGF's feature bank (RasterDataModule.add_modality)
    extra: Mapping[str, np.ndarray | str] = field(default_factory=dict)

    def read(self, window: Window) -> tuple[dict, np.ndarray]:
        """Raw modality windows and the reference-grid validity of ``window``."""
        r0, r1, c0, c1 = window
        rasters, valid = {}, np.ones((r1 - r0, c1 - c0), dtype=bool)
        for name, path in self.paths.items():
            r = self.ratios[name]
            rasters[name] = read_raster(path, self.nodata.get(name), (r0 * r, r1 * r, c0 * r, c1 * r))
            valid &= coarse_valid(rasters[name].valid, r)
        return rasters, valid

    def scene(self, core: Window, pad: int, normalizers: Mapping[str, Normalizer]) -> Scene:
        """The normalised :class:`Scene` of ``core`` with a ``pad`` halo, as the whole scene would show it."""
        h, w = self.shape
        r0, r1, c0, c1 = core
        read = (max(0, r0 - pad), min(h, r1 + pad), max(0, c0 - pad), min(w, c1 + pad))
        rasters, _ = self.read(read)
        # Beyond the scene edge the whole-scene array is padded (pad_mode): do the same on clipped sides.
        missing = (pad - (r0 - read[0]), pad - (read[1] - r1), pad - (c0 - read[2]), pad - (read[3] - c1))
        data = {}
        for name, raster in rasters.items():
            r = self.ratios[name]
            arr = normalizers[name].apply(raster.data, raster.valid)
            data[name] = pad_edges(arr, tuple(m * r for m in missing), self.pad_mode)
        ratios = dict(self.ratios)
        for name, cube in self.extra.items():
            cube = np.load(cube, mmap_mode="r") if isinstance(cube, str) else cube
            data[name] = pad_edges(np.asarray(cube[:, read[0]:read[1], read[2]:read[3]]), missing, self.pad_mode)
            ratios[name] = 1
        valid = np.ones((r1 - r0, c1 - c0), dtype=bool)
        for name, raster in rasters.items():
            r = self.ratios[name]
            rows = slice((r0 - read[0]) * r, (r1 - read[0]) * r)
            cols = slice((c0 - read[2]) * r, (c1 - read[2]) * r)
            valid &= coarse_valid(raster.valid[rows, cols], r)
        return Scene(data, ratios, valid, pad, normalizers=dict(normalizers), pad_mode=self.pad_mode)


def valid_counts(source: SceneSource, windows: list[Window]) -> np.ndarray:
    """Valid reference pixels per window (one read pass)."""
    return np.array([int(source.read(win)[1].sum()) for win in windows], dtype=np.int64)


class WindowedPredictDataset(Dataset):
    """Prediction samples of the whole scene, read window by window (pixel or tile sampling).

    ``pixel``: windows are ``window`` x ``window`` blocks, their valid pixels the samples (row-major).
    ``tile``: the whole scene's covering tiles (:func:`~rsfusion.datamodules.tiling.covering_tiles`), grouped
    by the block their origin falls in, so the tiles and owned pixels equal the in-memory ones.
    Samples carry global ``index`` / ``origin`` like the in-memory datasets. Indices must come in
    (mostly) increasing order, as prediction asks for them: one window is cached at a time.
    """

    def __init__(self, source: SceneSource, normalizers: Mapping[str, Normalizer], sampling: str, patch_size: int,
                 window: int, counts: np.ndarray | None = None):
        self.source, self.normalizers = source, dict(normalizers)
        self.sampling, self.patch_size = sampling, patch_size
        if sampling == "pixel":
            self.windows = grid_windows(source.shape, window)
            self.counts = valid_counts(source, self.windows) if counts is None else np.asarray(counts)
        else:
            self._group_tiles(window)
        self.ends = np.cumsum(self.counts)
        self._cached: tuple[int, Dataset] | None = None

    def _group_tiles(self, window: int) -> None:
        h, w = self.source.shape
        origins, keep = covering_tiles(self.source.shape, self.patch_size)
        block = (origins[:, 0] // window) * (-(-w // window)) + origins[:, 1] // window
        order = np.argsort(block, kind="stable")
        self.origins, self.keep, block = origins[order], keep[order], block[order]
        self.windows, counts = [], []
        for b in np.unique(block):
            sel = np.flatnonzero(block == b)
            ys, xs = self.origins[sel, 0], self.origins[sel, 1]
            self.windows.append((int(ys.min()), int(min(h, ys.max() + self.patch_size)),
                                 int(xs.min()), int(min(w, xs.max() + self.patch_size))))
            counts.append(len(sel))
        self.counts = np.array(counts, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def _window_dataset(self, k: int) -> Dataset:
        if self._cached is None or self._cached[0] != k:
            self._cached = None  # free the previous window before reading the next
            r0, r1, c0, c1 = core = self.windows[k]
            scene = self.source.scene(core, self.patch_size, self.normalizers)
            if self.sampling == "pixel":
                rows, cols = np.nonzero(scene.valid)
                dataset = PixelPatchDataset(scene, rows, cols, self.patch_size)
            else:
                first = int(self.ends[k] - self.counts[k])
                local = self.origins[first:self.ends[k]] - np.array([r0, c0])
                dataset = TileDataset(scene, local, self.patch_size, None, self.keep[first:self.ends[k]])
            self._cached = (k, dataset)
        return self._cached[1]

    def __getitems__(self, indices) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        which = np.searchsorted(self.ends, idx, side="right")
        order = np.argsort(which, kind="stable")
        idx, which = idx[order], which[order]
        parts = []
        for k in np.unique(which):
            local = idx[which == k] - (self.ends[k] - self.counts[k])
            batch = self._window_dataset(int(k)).__getitems__(local)
            r0, _, c0, _ = self.windows[k]
            key = "index" if "index" in batch else "origin"
            batch[key] = batch[key] + torch.tensor([r0, c0])
            parts.append(batch)
        batch = parts[0] if len(parts) == 1 else {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        if np.any(order != np.arange(len(order))):
            inverse = torch.from_numpy(np.argsort(order))
            batch = {key: value[inverse] for key, value in batch.items()}
        return batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}
