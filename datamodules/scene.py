"""A scene: co-registered modalities checked against each other, normalised and padded for patching."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping

import numpy as np
from affine import Affine

from rsfusion.datamodules.io import Raster, RasterError, RasterHeader, read_header, read_raster, same_crs

Normalization = Literal["zscore", "minmax", "minmax_global", "none"]
_TOLERANCE = 1e-3  # of a pixel: georeferencing written with float rounding still aligns


def _grid_ratio(ref: RasterHeader, other: RasterHeader) -> int:
    """How many ``other`` pixels span one ``ref`` pixel along each axis (an integer >= 1), or an error."""
    names = f"{ref.path} and {other.path}"
    georef = [h.crs is not None and h.transform is not None and h.transform != Affine.identity() for h in (ref, other)]
    if all(georef):
        for h in (ref, other):
            if abs(h.transform.b) > 1e-12 or abs(h.transform.d) > 1e-12:
                raise RasterError(f"{h.path}: rotated or sheared geotransform is not supported; warp it to a north-up grid first")
        if not same_crs(ref.crs, other.crs):
            raise RasterError(f"{names}: different CRS ({ref.crs} vs {other.crs}); reproject one onto the other's grid")
        rx, ry = ref.transform.a / other.transform.a, ref.transform.e / other.transform.e
        ratio = round(rx)
        if ratio < 1 or abs(rx - ratio) > _TOLERANCE * ratio or abs(ry - rx) > _TOLERANCE * ratio:
            raise RasterError(f"{names}: pixel sizes {ref.transform.a:g}x{-ref.transform.e:g} and "
                              f"{other.transform.a:g}x{-other.transform.e:g} are not an integer ratio of each other")
        dx = (other.transform.c - ref.transform.c) / other.transform.a
        dy = (other.transform.f - ref.transform.f) / other.transform.e
        expected = (ref.shape[0] * ratio, ref.shape[1] * ratio)
        if other.shape != expected:
            raise RasterError(f"{names}: different extents (bounds {_fmt(_bounds(ref))} vs {_fmt(_bounds(other))}); "
                              "crop both to the same area first")
        if max(abs(dx), abs(dy)) > _TOLERANCE:
            raise RasterError(f"{names}: misaligned pixel grids (offset by {dx:.3g}, {dy:.3g} pixels); "
                              "resample one onto the other's grid first")
        return ratio
    ratio = other.shape[0] // ref.shape[0] if ref.shape[0] else 0
    if ratio < 1 or other.shape != (ref.shape[0] * ratio, ref.shape[1] * ratio):
        raise RasterError(f"{names}: grid shapes {ref.shape} and {other.shape} do not match "
                          "(equal, or an integer multiple for finer modalities)")
    return ratio


def _bounds(h: RasterHeader) -> tuple[float, float, float, float]:
    t = h.transform
    x0, y0 = t.c, t.f
    x1, y1 = t * (h.shape[1], h.shape[0])
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def _fmt(bounds) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in bounds) + ")"


def reference_header(headers: Mapping[str, RasterHeader]) -> RasterHeader:
    """The coarsest modality's grid: labels, samples and maps live on it."""
    return min(headers.values(), key=lambda h: h.shape[0] * h.shape[1])


def grid_ratios(headers: Mapping[str, RasterHeader]) -> dict[str, int]:
    ref = reference_header(headers)
    return {name: _grid_ratio(ref, h) for name, h in headers.items()}


def check_label_grid(ref: RasterHeader, label_path: str) -> None:
    header = read_header(label_path)
    if _grid_ratio(ref, header) != 1:
        raise RasterError(f"{label_path}: label grid {header.shape} does not match the reference modality "
                          f"{ref.path} {ref.shape}")


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


def fit_band_stats(pixels: np.ndarray, mode: Normalization, clip_percentile: float | None) -> BandStats:
    """Statistics from ``pixels`` (bands, n) of valid pixels. Constant bands get scale 1, never 0."""
    pixels = pixels.astype(np.float64)
    bands = pixels.shape[0]
    if clip_percentile:
        lo = np.percentile(pixels, clip_percentile, axis=1)
        hi = np.percentile(pixels, 100 - clip_percentile, axis=1)
        pixels = np.clip(pixels, lo[:, None], hi[:, None])
    else:
        lo, hi = np.full(bands, -np.inf), np.full(bands, np.inf)
    if mode == "zscore":
        offset, scale = pixels.mean(axis=1), pixels.std(axis=1)
    elif mode == "minmax":
        offset, scale = pixels.min(axis=1), pixels.max(axis=1) - pixels.min(axis=1)
    elif mode == "minmax_global":
        offset = np.full(bands, pixels.min())
        scale = np.full(bands, pixels.max() - pixels.min())
    elif mode == "none":
        offset, scale = np.zeros(bands), np.ones(bands)
    else:
        raise ValueError(f"normalization must be zscore, minmax, minmax_global or none, got {mode!r}")
    scale = np.where(scale > 1e-12 * np.maximum(1.0, np.abs(offset)), scale, 1.0)
    return BandStats(offset.astype(np.float32), scale.astype(np.float32), lo.astype(np.float32), hi.astype(np.float32))


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


def fit_pca(pixels: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Principal axes of ``pixels`` (bands, n): returns (mean (bands,), axes (k, bands), std (k,))."""
    if not 1 <= components <= pixels.shape[0]:
        raise ValueError(f"pca: cannot keep {components} components of a {pixels.shape[0]}-band modality")
    pixels = pixels.astype(np.float64)
    mean = pixels.mean(axis=1)
    return pca_from_moments(mean, np.cov(pixels - mean[:, None]), components)


@dataclass
class Normalizer:
    """How one modality's raw bands become network input: band stats, nodata fill, optional PCA."""

    stats: BandStats
    fill: np.ndarray  # per output channel, written where the raw pixel is invalid
    pca: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (mean, axes, std) from fit_pca

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


def fit_normalizer(fit_pixels: np.ndarray, mode: Normalization, clip_percentile: float | None,
                   pca_components: int | None = None) -> Normalizer:
    """Fit on ``fit_pixels`` (bands, n): the fill value is the mean normalised pixel (0 after PCA)."""
    stats = fit_band_stats(fit_pixels, mode, clip_percentile)
    normalised = stats.apply(fit_pixels[:, :, None])[:, :, 0]
    if pca_components:
        return Normalizer(stats, np.zeros(pca_components, dtype=np.float32), fit_pca(normalised, pca_components))
    return Normalizer(stats, normalised.mean(axis=1).astype(np.float32))


def pad_scene_array(arr: np.ndarray, pad: int) -> np.ndarray:
    """Reflect-pad a (C, H, W) array by ``pad`` pixels on every side (how patches see beyond edges)."""
    return np.pad(arr, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")


@dataclass
class Scene:
    """Normalised modalities on a shared reference grid, reflect-padded by ``pad`` reference pixels.

    ``data[name]`` is float32 (bands, (H + 2 pad) r, (W + 2 pad) r) with r = ``ratios[name]``;
    ``valid`` is (H, W) on the reference grid: True where every modality has valid data.
    """

    data: dict[str, np.ndarray]
    ratios: dict[str, int]
    valid: np.ndarray
    pad: int
    crs: object = None
    transform: Affine | None = None
    normalizers: dict[str, Normalizer] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.valid.shape

    @property
    def in_channels(self) -> dict[str, int]:
        return {name: arr.shape[0] for name, arr in self.data.items()}

    def add(self, name: str, cube: np.ndarray) -> None:
        """Add a (C, H, W) cube on the reference grid (e.g. a feature bank) as one more modality."""
        if cube.ndim != 3 or cube.shape[1:] != self.shape:
            raise ValueError(f"{name}: expected a (C, {self.shape[0]}, {self.shape[1]}) cube, got {cube.shape}")
        pad = self.pad
        self.data[name] = pad_scene_array(cube, pad)
        self.ratios[name] = 1


def _block_mask(mask: np.ndarray, ratio: int) -> np.ndarray:
    return mask if ratio == 1 else np.repeat(np.repeat(mask, ratio, axis=0), ratio, axis=1)


def _coarse_valid(valid: np.ndarray, ratio: int) -> np.ndarray:
    """A reference pixel is valid only if its whole block of finer pixels is valid."""
    if ratio == 1:
        return valid
    h, w = valid.shape[0] // ratio, valid.shape[1] // ratio
    return valid.reshape(h, ratio, w, ratio).all(axis=(1, 3))


def load_scene(paths: Mapping[str, str], pad: int, *, normalization: Normalization = "zscore",
               normalization_overrides: Mapping[str, Normalization] | None = None,
               clip_percentile: float | None = None, fit_mask: np.ndarray | None = None,
               pca: Mapping[str, int] | None = None, nodata: Mapping[str, float] | None = None) -> Scene:
    """Read, check, normalise and pad every modality.

    ``fit_mask`` (reference grid) restricts the pixels that statistics are fitted on (e.g. training
    pixels only, against transductive leakage); by default every valid pixel of the scene is used.
    """
    headers = {name: read_header(p) for name, p in paths.items()}
    ratios = grid_ratios(headers)
    ref = reference_header(headers)
    rasters: dict[str, Raster] = {name: read_raster(p, (nodata or {}).get(name)) for name, p in paths.items()}
    valid = np.ones(ref.shape, dtype=bool)
    for name, raster in rasters.items():
        if not raster.valid.any():
            raise RasterError(f"{raster.path}: every pixel is nodata or NaN")
        valid &= _coarse_valid(raster.valid, ratios[name])
    if not valid.any():
        raise RasterError(f"{', '.join(paths.values())}: no pixel is valid in every modality at once")
    fit = valid if fit_mask is None else (fit_mask & valid)
    if not fit.any():
        raise RasterError(f"{ref.path}: no valid pixel to fit normalisation statistics on")
    data, normalizers = {}, {}
    for name, raster in rasters.items():
        r = ratios[name]
        mode = (normalization_overrides or {}).get(name, normalization)
        fit_pixels = raster.data[:, _block_mask(fit, r) & raster.valid]
        normalizers[name] = fit_normalizer(fit_pixels, mode, clip_percentile, (pca or {}).get(name))
        data[name] = pad_scene_array(normalizers[name].apply(raster.data, raster.valid), pad * r)
    return Scene(data, ratios, valid, pad, ref.crs, ref.transform, normalizers)
