"""Full-scene prediction in windows, for scenes larger than memory.

The scene is never held whole: each window (plus a halo of ``pad`` pixels) is read from disk,
normalised and cut into samples when its first sample is asked for. Windows reproduce the in-memory
scene exactly: the halo comes from the neighbouring pixels and the scene edge is padded like
:func:`~rsfusion.datamodules.scene.load_scene` (reflect or zero, ``pad_mode``). Normalisation statistics come from the checkpoint, the loaded
scene, or a streaming pass over the windows (:func:`fit_streaming`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from rsfusion.datamodules.io import RasterError, read_raster
from rsfusion.datamodules.sampling import PixelPatchDataset, TileDataset
from rsfusion.datamodules.scene import (BandStats, Normalization, Normalizer, PadMode, Scene, _block_mask, _coarse_valid,
                               pad_edges, pca_from_moments)
from rsfusion.datamodules.tiling import Window, covering_tiles, grid_windows

MAX_PERCENTILE_SAMPLES = 1_000_000


@dataclass
class SceneSource:
    """Where a scene's modalities live on disk and how their grids relate (no pixels held)."""

    paths: Mapping[str, str]
    ratios: Mapping[str, int]
    shape: tuple[int, int]
    nodata: Mapping[str, float]
    pad_mode: PadMode = "reflect"

    def read(self, window: Window) -> tuple[dict, np.ndarray]:
        """Raw modality windows and the reference-grid validity of ``window``."""
        r0, r1, c0, c1 = window
        rasters, valid = {}, np.ones((r1 - r0, c1 - c0), dtype=bool)
        for name, path in self.paths.items():
            r = self.ratios[name]
            rasters[name] = read_raster(path, self.nodata.get(name), (r0 * r, r1 * r, c0 * r, c1 * r))
            valid &= _coarse_valid(rasters[name].valid, r)
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
        valid = np.ones((r1 - r0, c1 - c0), dtype=bool)
        for name, raster in rasters.items():
            r = self.ratios[name]
            rows = slice((r0 - read[0]) * r, (r1 - read[0]) * r)
            cols = slice((c0 - read[2]) * r, (c1 - read[2]) * r)
            valid &= _coarse_valid(raster.valid[rows, cols], r)
        return Scene(data, dict(self.ratios), valid, pad, normalizers=dict(normalizers), pad_mode=self.pad_mode)


def valid_counts(source: SceneSource, windows: list[Window]) -> np.ndarray:
    """Valid reference pixels per window (one read pass)."""
    return np.array([int(source.read(win)[1].sum()) for win in windows], dtype=np.int64)


class _Moments:
    """Count, sum, cross-products, min and max of (bands, n) pixel batches, shifted for precision."""

    def __init__(self, bands: int, cross: bool):
        self.n, self.shift = 0, None
        self.sum = np.zeros(bands)
        self.cross = np.zeros((bands, bands)) if cross else None
        self.sumsq = np.zeros(bands)
        self.min, self.max = np.full(bands, np.inf), np.full(bands, -np.inf)

    def add(self, x: np.ndarray) -> None:
        if x.shape[1] == 0:
            return
        if self.shift is None:
            self.shift = x.mean(axis=1)
        d = x - self.shift[:, None]
        self.n += x.shape[1]
        self.sum += d.sum(axis=1)
        self.sumsq += (d * d).sum(axis=1)
        if self.cross is not None:
            self.cross += d @ d.T
        self.min, self.max = np.minimum(self.min, x.min(axis=1)), np.maximum(self.max, x.max(axis=1))

    @property
    def mean(self) -> np.ndarray:
        return self.shift + self.sum / self.n

    @property
    def var(self) -> np.ndarray:
        return np.maximum(self.sumsq / self.n - (self.sum / self.n) ** 2, 0.0)

    def cov(self) -> np.ndarray:
        """Unbiased covariance, as ``np.cov``."""
        centred = self.sum / self.n
        return (self.cross - self.n * np.outer(centred, centred)) / max(self.n - 1, 1)


def _stats_from_moments(m: _Moments, mode: Normalization, lo: np.ndarray, hi: np.ndarray) -> BandStats:
    bands = len(m.sum)
    if mode == "zscore":
        offset, scale = m.mean, np.sqrt(m.var)
    elif mode == "minmax":
        offset, scale = m.min, m.max - m.min
    elif mode == "minmax_global":
        offset, scale = np.full(bands, m.min.min()), np.full(bands, m.max.max() - m.min.min())
    elif mode == "none":
        offset, scale = np.zeros(bands), np.ones(bands)
    else:
        raise ValueError(f"normalization must be zscore, minmax, minmax_global or none, got {mode!r}")
    scale = np.where(scale > 1e-12 * np.maximum(1.0, np.abs(offset)), scale, 1.0)
    return BandStats(*(v.astype(np.float32) for v in (offset, scale, lo, hi)))


def fit_streaming(source: SceneSource, windows: list[Window], modes: Mapping[str, Normalization],
                  clip_percentile: float | None = None, fit_mask: np.ndarray | None = None,
                  pca: Mapping[str, int] | None = None, seed: int = 0) -> dict[str, Normalizer]:
    """The normalisers :func:`~rsfusion.datamodules.scene.load_scene` would fit, from one window at a time.

    Means, standard deviations, min/max and PCA covariances are exact (float64 moments); with
    ``clip_percentile`` the percentiles come from a seeded random sample of at most
    :data:`MAX_PERCENTILE_SAMPLES` pixels per modality, so they are close, not equal.
    """
    pca = pca or {}

    def fit_pixels(window):
        rasters, valid = source.read(window)
        if fit_mask is not None:
            r0, r1, c0, c1 = window
            valid &= fit_mask[r0:r1, c0:c1]
        return {name: ras.data[:, _block_mask(valid, source.ratios[name]) & ras.valid].astype(np.float64)
                for name, ras in rasters.items()}

    names = list(source.paths)
    bounds = {}
    if clip_percentile:
        rng = np.random.default_rng(seed)
        total = source.shape[0] * source.shape[1]
        samples = {name: [] for name in names}
        for window in windows:
            for name, x in fit_pixels(window).items():
                rate = min(1.0, MAX_PERCENTILE_SAMPLES / (total * source.ratios[name] ** 2))
                samples[name].append(x[:, rng.random(x.shape[1]) < rate])
        for name in names:
            x = np.concatenate(samples[name], axis=1)
            bounds[name] = (np.percentile(x, clip_percentile, axis=1), np.percentile(x, 100 - clip_percentile, axis=1))
    moments: dict[str, _Moments] = {}
    for window in windows:
        for name, x in fit_pixels(window).items():
            if name in bounds:
                x = np.clip(x, bounds[name][0][:, None], bounds[name][1][:, None])
            moments.setdefault(name, _Moments(x.shape[0], cross=name in pca)).add(x)
    normalizers = {}
    for name in names:
        m = moments.get(name)
        if m is None or m.n == 0:
            raise RasterError(f"{source.paths[name]}: no valid pixel to fit normalisation statistics on")
        bands = len(m.sum)
        lo, hi = bounds.get(name, (np.full(bands, -np.inf), np.full(bands, np.inf)))
        stats = _stats_from_moments(m, modes[name], lo, hi)
        offset, scale = stats.offset.astype(np.float64), stats.scale.astype(np.float64)
        mean = (m.mean - offset) / scale
        if name in pca:
            cov = m.cov() / np.outer(scale, scale)
            normalizers[name] = Normalizer(stats, np.zeros(pca[name], dtype=np.float32),
                                           pca_from_moments(mean, cov, pca[name]))
        else:
            normalizers[name] = Normalizer(stats, mean.astype(np.float32))
    return normalizers


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
        self.sampling, self.size = sampling, patch_size
        if sampling == "pixel":
            self.windows = grid_windows(source.shape, window)
            self.counts = valid_counts(source, self.windows) if counts is None else np.asarray(counts)
        else:
            self._group_tiles(window)
        self.ends = np.cumsum(self.counts)
        self._cached: tuple[int, Dataset] | None = None

    def _group_tiles(self, window: int) -> None:
        h, w = self.source.shape
        origins, keep = covering_tiles(self.source.shape, self.size)
        block = (origins[:, 0] // window) * (-(-w // window)) + origins[:, 1] // window
        order = np.argsort(block, kind="stable")
        self.origins, self.keep, block = origins[order], keep[order], block[order]
        self.windows, counts = [], []
        for b in np.unique(block):
            sel = np.flatnonzero(block == b)
            ys, xs = self.origins[sel, 0], self.origins[sel, 1]
            self.windows.append((int(ys.min()), int(min(h, ys.max() + self.size)),
                                 int(xs.min()), int(min(w, xs.max() + self.size))))
            counts.append(len(sel))
        self.counts = np.array(counts, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def _window_dataset(self, k: int) -> Dataset:
        if self._cached is None or self._cached[0] != k:
            self._cached = None  # free the previous window before reading the next
            r0, r1, c0, c1 = core = self.windows[k]
            scene = self.source.scene(core, self.size, self.normalizers)
            if self.sampling == "pixel":
                rows, cols = np.nonzero(scene.valid)
                dataset = PixelPatchDataset(scene, rows, cols, self.size)
            else:
                first = int(self.ends[k] - self.counts[k])
                local = self.origins[first:self.ends[k]] - np.array([r0, c0])
                dataset = TileDataset(scene, local, self.size, None, self.keep[first:self.ends[k]])
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
