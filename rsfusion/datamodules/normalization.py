"""Band normalisation: one statistics fit, fed the whole scene (in memory) or window by window (streaming).

:func:`fit_normalizers` reads the scene through a ``read(window) -> (rasters, valid)`` function and
accumulates float64 moments (count, sum, squares, cross-products, min, max) window by window, so
means, standard deviations, min/max and PCA covariances do not depend on how the scene is cut,
up to float rounding. ``clip_percentile`` bounds come from a seeded sample of at most
:data:`MAX_PERCENTILE_SAMPLES` pixels per modality whose membership depends only on each pixel's
position and the seed, so the whole scene and its windows sample the same pixels (all of them on
scenes up to that size: the percentiles are then exact).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Mapping

import numpy as np

from rsfusion.datamodules.errors import RasterError
from rsfusion.datamodules.io import Raster
from rsfusion.datamodules.tiling import Window, block_mask

Normalization = Literal["zscore", "minmax", "minmax_global", "none"]
Reader = Callable[[Window], tuple[Mapping[str, Raster], np.ndarray]]
MAX_PERCENTILE_SAMPLES = 1_000_000


@dataclass
class BandStats:
    """Per-band affine normalisation x -> (clip(x, lo, hi) - offset) / scale."""

    offset: np.ndarray
    scale: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    def apply(self, data: np.ndarray) -> np.ndarray:
        out = np.clip(data.astype(np.float32), self.lo[:, None, None], self.hi[:, None, None])
        out -= self.offset[:, None, None]
        out /= self.scale[:, None, None]
        return out


@dataclass
class Normalizer:
    """How one modality's raw bands become network input: band stats, nodata fill, optional PCA."""

    stats: BandStats
    fill: np.ndarray  # per output channel, written where the raw pixel is invalid
    pca: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (mean, axes, std) from pca_from_moments

    def apply(self, data: np.ndarray, valid: np.ndarray) -> np.ndarray:
        arr = self.stats.apply(data)
        if self.pca is not None:
            mean, axes, std = self.pca
            arr = np.einsum("kc,chw->khw", axes / std[:, None], arr - mean[:, None, None]).astype(np.float32)
        arr[:, ~valid] = self.fill[:, None]
        return arr

    def state(self) -> dict[str, np.ndarray]:
        """Plain arrays (for checkpoints); :meth:`from_state` inverts it."""
        s = self.stats
        out = dict(offset=s.offset, scale=s.scale, lo=s.lo, hi=s.hi, fill=self.fill)
        if self.pca is not None:
            out.update(pca_mean=self.pca[0], pca_axes=self.pca[1], pca_std=self.pca[2])
        return out

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray]) -> "Normalizer":
        arr = {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}
        pca = (arr["pca_mean"], arr["pca_axes"], arr["pca_std"]) if "pca_mean" in arr else None
        return cls(BandStats(arr["offset"], arr["scale"], arr["lo"], arr["hi"]), arr["fill"], pca)


def pca_from_moments(mean: np.ndarray, cov: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, axes (k, bands), std (k,)) of the leading ``components`` principal axes.

    Each axis is signed so that its largest-magnitude loading is positive: eigen-solvers may return
    either sign, and a flipped axis would silently negate a network input.
    """
    if not 1 <= components <= len(mean):
        raise ValueError(f"pca: cannot keep {components} components of a {len(mean)}-band modality")
    eigvals, eigvecs = np.linalg.eigh(np.atleast_2d(cov))
    order = np.argsort(eigvals)[::-1][:components]
    axes = eigvecs[:, order].T
    peak = axes[np.arange(components), np.abs(axes).argmax(axis=1)]
    axes = axes * np.where(peak < 0, -1.0, 1.0)[:, None]
    std = np.sqrt(np.maximum(eigvals[order], 0.0))
    std = np.where(std > 1e-12, std, 1.0)
    return mean.astype(np.float32), axes.astype(np.float32), std.astype(np.float32)


class Moments:
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


def band_stats(m: Moments, mode: Normalization, lo: np.ndarray, hi: np.ndarray) -> BandStats:
    """The ``mode`` statistics of (already clipped) moments. Constant bands get scale 1, never 0."""
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


def sampled(rows: np.ndarray, cols: np.ndarray, width: int, rate: float, seed: int) -> np.ndarray:
    """Whether each pixel (global row, col of a ``width``-wide grid) is in the seeded ``rate`` sample:
    a hash (splitmix64) of its position and the seed, so the sample does not depend on the windows."""
    if rate >= 1.0:
        return np.ones(rows.shape, dtype=bool)
    z = (rows.astype(np.uint64) * np.uint64(width) + cols.astype(np.uint64)
         + np.uint64(seed * 0x9E3779B97F4A7C15 % 2 ** 64))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53 < rate


def in_memory_reader(rasters: Mapping[str, Raster], valid: np.ndarray, ratios: Mapping[str, int]) -> Reader:
    """A :data:`Reader` over rasters already in memory (views, no copies)."""

    def read(window: Window):
        r0, r1, c0, c1 = window
        parts = {}
        for name, raster in rasters.items():
            r = ratios[name]
            rows, cols = slice(r0 * r, r1 * r), slice(c0 * r, c1 * r)
            parts[name] = Raster(raster.path, raster.data[:, rows, cols], raster.valid[rows, cols])
        return parts, valid[r0:r1, c0:c1]

    return read


def fit_normalizers(read: Reader, windows: list[Window], shape: tuple[int, int], ratios: Mapping[str, int],
                    paths: Mapping[str, str], modes: Mapping[str, Normalization],
                    clip_percentile: float | None = None, fit_mask: np.ndarray | None = None,
                    pca: Mapping[str, int] | None = None, seed: int = 0) -> dict[str, Normalizer]:
    """One :class:`Normalizer` per modality of ``paths``, fitted on the valid pixels of ``windows``
    (which must cover the ``shape`` reference grid once) where ``fit_mask`` is True (all when None).

    Each modality is normalised by ``modes[name]``, clipped at ``clip_percentile`` and 100 -
    ``clip_percentile`` first if given; modalities in ``pca`` are then projected on that many
    principal axes. The nodata fill is the mean normalised pixel (0 after PCA). ``read`` may be
    called twice per window (once for the percentiles, once for the moments).
    """
    pca = pca or {}
    names = list(paths)

    def fit_pixels(window: Window):
        rasters, valid = read(window)
        r0, r1, c0, c1 = window
        if fit_mask is not None:
            valid = valid & fit_mask[r0:r1, c0:c1]
        for name in names:
            r, raster = ratios[name], rasters[name]
            mask = block_mask(valid, r) & raster.valid
            yield name, raster.data[:, mask].astype(np.float64), mask, (r0 * r, c0 * r)

    whole = list(fit_pixels(windows[0])) if len(windows) == 1 else None  # one window (in memory): gathered once

    def pixels_of(window: Window):
        return whole if whole is not None else fit_pixels(window)

    bounds = {}
    if clip_percentile:
        samples = {name: [] for name in names}
        for window in windows:
            for name, x, mask, (top, left) in pixels_of(window):
                rate = min(1.0, MAX_PERCENTILE_SAMPLES / (shape[0] * shape[1] * ratios[name] ** 2))
                if rate < 1.0:
                    rows, cols = np.nonzero(mask)
                    x = x[:, sampled(rows + top, cols + left, shape[1] * ratios[name], rate, seed)]
                samples[name].append(x)
        for name in names:
            x = np.concatenate(samples[name], axis=1)
            if x.shape[1]:
                bounds[name] = (np.percentile(x, clip_percentile, axis=1),
                                np.percentile(x, 100 - clip_percentile, axis=1))
    moments: dict[str, Moments] = {}
    for window in windows:
        for name, x, _, _ in pixels_of(window):
            if name in bounds:
                x = np.clip(x, bounds[name][0][:, None], bounds[name][1][:, None])
            moments.setdefault(name, Moments(x.shape[0], cross=name in pca)).add(x)
    normalizers = {}
    for name in names:
        m = moments.get(name)
        if m is None or m.n == 0:
            raise RasterError(f"{paths[name]}: no valid pixel to fit normalisation statistics on")
        bands = len(m.sum)
        lo, hi = bounds.get(name, (np.full(bands, -np.inf), np.full(bands, np.inf)))
        stats = band_stats(m, modes[name], lo, hi)
        offset, scale = stats.offset.astype(np.float64), stats.scale.astype(np.float64)
        mean = (m.mean - offset) / scale
        if name in pca:
            cov = m.cov() / np.outer(scale, scale)
            normalizers[name] = Normalizer(stats, np.zeros(pca[name], dtype=np.float32),
                                           pca_from_moments(mean, cov, pca[name]))
        else:
            normalizers[name] = Normalizer(stats, mean.astype(np.float32))
    return normalizers

