"""A scene: co-registered modalities checked against each other, normalised and padded for patching."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Mapping, Sequence

import numpy as np
from affine import Affine

from rsfusion.datamodules.errors import RasterError
from rsfusion.datamodules.io import Raster, RasterHeader, read_header, read_raster, same_crs
from rsfusion.datamodules.normalization import Normalization, Normalizer, fit_normalizers, in_memory_reader
from rsfusion.datamodules.tiling import coarse_valid

PadMode = Literal["reflect", "zero"]
_TOLERANCE = 1e-3  # of a pixel: georeferencing written with float rounding still aligns


def _grid_ratio(ref: RasterHeader, other: RasterHeader) -> int:
    """How many ``other`` pixels span one ``ref`` pixel along each axis (an integer >= 1), or an error."""
    names = f"{ref.path} and {other.path}"
    georef = [h.crs is not None and h.transform is not None and h.transform != Affine.identity() for h in (ref, other)]
    if all(georef):
        for h in (ref, other):
            if abs(h.transform.b) > 1e-12 or abs(h.transform.d) > 1e-12:
                raise RasterError(f"{h.path}: rotated or sheared geotransform is not supported; "
                                  "warp it to a north-up grid first")
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
    x1, y1 = t @ (h.shape[1], h.shape[0])
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def _fmt(bounds) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in bounds) + ")"


def reference_header(headers: Mapping[str, RasterHeader]) -> RasterHeader:
    """The coarsest modality's grid: labels, samples and maps live on it."""
    return min(headers.values(), key=lambda h: h.shape[0] * h.shape[1])


def has_transform(header: RasterHeader) -> bool:
    return header.transform is not None and header.transform != Affine.identity()


def borrow_georeferencing(ref: RasterHeader, headers: Mapping[str, RasterHeader], ratios: Mapping[str, int],
                          extra: Sequence[RasterHeader] = ()) -> tuple[RasterHeader, str | None]:
    """``ref`` with the transform (and CRS, if any) of the first input that has one, when ``ref`` has
    none (a ``.mat``/``.npy`` array beside GeoTIFFs): maps then land where the georeferenced input is.

    ``extra`` headers (e.g. label rasters) count when they lie on ``ref``'s grid. Returns the header
    and the path the georeferencing came from (None when ``ref`` keeps its own or nothing has one).
    """
    if has_transform(ref):
        return ref, None
    candidates = [(h, ratios[name]) for name, h in headers.items()] + [(h, 1) for h in extra if h.shape == ref.shape]
    for header, ratio in candidates:
        if has_transform(header):
            return replace(ref, crs=header.crs, transform=header.transform @ Affine.scale(ratio)), header.path
    return ref, None


def grid_ratios(headers: Mapping[str, RasterHeader]) -> dict[str, int]:
    ref = reference_header(headers)
    return {name: _grid_ratio(ref, h) for name, h in headers.items()}


def check_label_grid(ref: RasterHeader, label_path: str) -> None:
    header = read_header(label_path)
    if _grid_ratio(ref, header) != 1:
        raise RasterError(f"{label_path}: label grid {header.shape} does not match the reference modality "
                          f"{ref.path} {ref.shape}")


def pad_edges(arr: np.ndarray, widths: tuple[int, int, int, int], mode: PadMode = "reflect") -> np.ndarray:
    """Pad a (C, H, W) array by (top, bottom, left, right) pixels: mirror the image (``reflect``, the
    edge pixel not repeated) or ``zero`` in normalised units (what the network sees: the band mean
    under zscore, the band minimum under minmax)."""
    top, bottom, left, right = widths  # mode: checked once, by RasterDataModule
    return np.pad(arr, ((0, 0), (top, bottom), (left, right)), mode="reflect" if mode == "reflect" else "constant")


def pad_scene_array(arr: np.ndarray, pad: int, mode: PadMode = "reflect") -> np.ndarray:
    """Pad a (C, H, W) array by ``pad`` pixels on every side (how patches see beyond the scene edge)."""
    return pad_edges(arr, (pad, pad, pad, pad), mode)


@dataclass
class Scene:
    """Normalised modalities on a shared reference grid, padded by ``pad`` reference pixels (``pad_mode``).

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
    pad_mode: PadMode = "reflect"

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
        self.data[name] = pad_scene_array(cube, self.pad, self.pad_mode)
        self.ratios[name] = 1


def load_scene(paths: Mapping[str, str], pad: int, *, normalization: Normalization = "zscore",
               normalization_overrides: Mapping[str, Normalization] | None = None,
               clip_percentile: float | None = None, fit_mask: np.ndarray | None = None,
               pca: Mapping[str, int] | None = None, nodata: Mapping[str, float] | None = None,
               pad_mode: PadMode = "reflect", seed: int = 0) -> Scene:
    """Read, check, normalise and pad every modality (``pad_mode``: see :func:`pad_edges`).

    Statistics come from :func:`~rsfusion.datamodules.normalization.fit_normalizers` fed the whole
    scene (``seed`` picks the ``clip_percentile`` sample of scenes too large to use every pixel).

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
        valid &= coarse_valid(raster.valid, ratios[name])
    if not valid.any():
        raise RasterError(f"{', '.join(paths.values())}: no pixel is valid in every modality at once")
    fit = valid if fit_mask is None else (fit_mask & valid)
    if not fit.any():
        raise RasterError(f"{ref.path}: no valid pixel to fit normalisation statistics on")
    modes = {name: (normalization_overrides or {}).get(name, normalization) for name in paths}
    normalizers = fit_normalizers(in_memory_reader(rasters, valid, ratios), [(0, ref.shape[0], 0, ref.shape[1])],
                                  ref.shape, ratios, paths, modes, clip_percentile, fit, pca, seed)
    data = {name: pad_scene_array(normalizers[name].apply(raster.data, raster.valid), pad * ratios[name], pad_mode)
            for name, raster in rasters.items()}
    return Scene(data, ratios, valid, pad, ref.crs, ref.transform, normalizers, pad_mode)
