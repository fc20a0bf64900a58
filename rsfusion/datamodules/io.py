"""Reading rasters (GeoTIFF and anything GDAL reads, ``.npy``, ``.mat``) and writing outputs atomically.

Every reading problem becomes a one-line :class:`RasterError` that names the file and the problem.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import rasterio
import rasterio.enums
import rasterio.shutil
import rasterio.windows
from affine import Affine
from rasterio.errors import RasterioError, RasterioIOError

LABEL_KEYS = ("label", "labels", "gt", "TRLabel", "TSLabel", "mask_train", "mask_test",
              "trainlabels", "testlabels", "TrainImage", "TestImage")
# rasterio < 1.4 raises RasterioIOError (an OSError) for files GDAL cannot open, outside RasterioError
RASTERIO_ERRORS = (RasterioError, RasterioIOError)
GDAL_SUFFIXES = {".tif", ".tiff", ".img", ".vrt", ".jp2", ".hdr", ".dat", ".bsq", ".bil", ".bip", ".nc"}


class InputError(ValueError):
    """Bad input (data or configuration) that the user must fix; reported as one line, no traceback."""

    latest: "InputError | None" = None  # the CLI finds it even when a library re-wraps the exception

    def __init__(self, *args):
        super().__init__(*args)
        InputError.latest = self


class RasterError(InputError):
    """A raster (or label map) that cannot be used as it is; the message names the file."""


@dataclass
class Raster:
    """A raster in memory: ``data`` is (bands, rows, cols); ``valid`` marks pixels usable as data."""

    path: str
    data: np.ndarray
    valid: np.ndarray
    crs: rasterio.crs.CRS | None = None
    transform: Affine | None = None
    nodata: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[1], self.data.shape[2]

    @property
    def bands(self) -> int:
        return self.data.shape[0]

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None and self.transform is not None and self.transform != Affine.identity()


@dataclass
class RasterHeader:
    """What can be known about a raster without reading its pixels."""

    path: str
    bands: int
    shape: tuple[int, int]
    crs: rasterio.crs.CRS | None = None
    transform: Affine | None = None


def _check_exists(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise RasterError(f"{path}: file not found")
    if path.is_dir():
        raise RasterError(f"{path}: is a directory, expected a raster file")
    return path


def _to_chw(array: np.ndarray, path: Path, channels_last: bool) -> np.ndarray:
    """Arrays from .npy/.mat files are (H, W) or (H, W, C) like the benchmark releases."""
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3:
        return np.moveaxis(array, -1, 0) if channels_last else array
    raise RasterError(f"{path}: expected a 2-D or 3-D array, got shape {array.shape}")


def _load_mat(path: Path, key: str | None) -> np.ndarray:
    import h5py
    import scipy.io

    try:
        if h5py.is_hdf5(path):  # MATLAB v7.3 files are HDF5; h5py sees their arrays transposed
            with h5py.File(path, "r") as f:
                arrays = {k: np.asarray(f[k]).T for k in f.keys() if isinstance(f[k], h5py.Dataset)}
        else:
            arrays = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    except Exception as err:  # scipy raises many kinds (ValueError, IndexError, MatReadError...)
        raise RasterError(f"{path}: cannot read .mat file ({type(err).__name__}: {_first_line(err)})") from None
    if key is not None:
        if key not in arrays:
            raise RasterError(f"{path}: no key {key!r} in .mat file; keys found: {sorted(arrays)}")
        return np.asarray(arrays[key])
    candidates = [k for k, v in arrays.items() if isinstance(v, np.ndarray) and v.ndim in (2, 3)]
    if len(candidates) != 1:
        raise RasterError(f"{path}: cannot tell which array to use, pass a key; keys found: {sorted(arrays)}")
    return np.asarray(arrays[candidates[0]])


def mat_keys(path: str | os.PathLike) -> list[str]:
    """The variable names in a ``.mat`` file (v5 or v7.3), without reading the arrays."""
    import h5py
    import scipy.io

    path = _check_exists(path)
    try:
        if h5py.is_hdf5(path):
            with h5py.File(path, "r") as f:
                return [k for k in f.keys() if isinstance(f[k], h5py.Dataset)]
        return [name for name, _, _ in scipy.io.whosmat(path)]
    except Exception as err:  # noqa: BLE001 (as in _load_mat: scipy raises many kinds)
        raise RasterError(f"{path}: cannot read .mat file ({type(err).__name__}: {_first_line(err)})") from None


def is_gdal_raster(path: str | os.PathLike) -> bool:
    """A file read through GDAL (may carry georeferencing), not a ``.npy``/``.mat`` array."""
    return Path(split_key(path)[0]).suffix.lower() not in (".npy", ".mat")


def split_key(path: str | os.PathLike) -> tuple[str, str | None]:
    """``"data.mat:HSI"`` names the array ``HSI`` inside ``data.mat``."""
    text = str(path)
    head, sep, tail = text.rpartition(":")
    if sep and head.lower().endswith(".mat") and tail and "/" not in tail:
        return head, tail
    return text, None


def read_header(path: str | os.PathLike) -> RasterHeader:
    """Band count, grid shape and georeferencing, reading as little as possible."""
    file, key = split_key(path)
    p = _check_exists(file)
    suffix = p.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(p, mmap_mode="r")
        except (ValueError, OSError, EOFError) as err:  # EOFError: a 0-byte file
            raise RasterError(f"{p}: cannot read .npy file ({err})") from None
        chw = _to_chw(arr, p, channels_last=True)
        return RasterHeader(str(path), chw.shape[0], (chw.shape[1], chw.shape[2]))
    if suffix == ".mat":
        chw = _to_chw(_load_mat(p, key), p, channels_last=True)
        return RasterHeader(str(path), chw.shape[0], (chw.shape[1], chw.shape[2]))
    try:
        with rasterio.open(p) as src:
            return RasterHeader(str(path), src.count, (src.height, src.width), src.crs, src.transform)
    except RASTERIO_ERRORS as err:
        raise RasterError(f"{p}: not a raster GDAL can open ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    """GDAL's useful detail often sits in the chained cause ("See previous exception")."""
    cause = err.__cause__ or err.__context__
    if cause is not None and "previous exception" in str(err):
        err = cause
    text = str(err.args[-1] if err.args else err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def same_crs(a, b) -> bool:
    """Equivalent CRSs written differently (EPSG code vs PROJ string vs WKT) count as the same."""
    if a is None or b is None:
        return a is None and b is None
    if a == b:
        return True
    code_a, code_b = a.to_epsg(), b.to_epsg()
    return code_a is not None and code_a == code_b


def read_raster(path: str | os.PathLike, nodata: float | None = None,
                window: tuple[int, int, int, int] | None = None) -> Raster:
    """Read a raster (or the ``window`` rows r0:r1, cols c0:c1 of it) as (bands, rows, cols) + validity.

    A pixel is invalid when any band is NaN/inf or equals the nodata value (the file's own, or
    ``nodata`` given here, which wins). Invalid pixels are never used as samples or labels and their
    raw values never reach a network. Windows are read from disk alone for GDAL rasters and ``.npy``
    (memory-mapped); a ``.mat`` file is loaded whole and sliced.
    """
    file, key = split_key(path)
    p = _check_exists(file)
    suffix = p.suffix.lower()
    crs = transform = None
    rows = cols = slice(None)
    if window is not None:
        rows, cols = slice(window[0], window[1]), slice(window[2], window[3])
    if suffix in (".npy", ".mat"):
        try:
            array = np.load(p, mmap_mode="r") if suffix == ".npy" else _load_mat(p, key)
        except (ValueError, OSError, EOFError) as err:  # EOFError: a 0-byte file
            raise RasterError(f"{p}: cannot read .npy file ({err})") from None
        data = np.ascontiguousarray(_to_chw(array, p, channels_last=True)[:, rows, cols])
    else:
        try:
            with rasterio.open(p) as src:
                gdal_window = None if window is None else rasterio.windows.Window.from_slices(rows, cols)
                data = src.read(window=gdal_window)
                crs, transform = src.crs, src.transform
                if nodata is None:
                    nodata = src.nodata
        except RASTERIO_ERRORS as err:
            raise RasterError(f"{p}: unreadable or corrupt raster ({_first_line(err)})") from None
    if data.dtype.kind not in "biuf":
        raise RasterError(f"{p}: unsupported data type {data.dtype}")
    valid = np.ones(data.shape[1:], dtype=bool)
    if data.dtype.kind == "f":
        valid &= np.isfinite(data).all(axis=0)
    if nodata is not None and not np.isnan(nodata) and _representable(nodata, data.dtype):
        valid &= ~(data == np.asarray(nodata, dtype=data.dtype)).any(axis=0)
    return Raster(str(path), data, valid, crs, transform, nodata)


def _representable(value: float, dtype: np.dtype) -> bool:
    if np.dtype(dtype).kind == "f":
        return True
    info = np.iinfo(dtype)
    return float(value).is_integer() and info.min <= value <= info.max


def read_labels(path: str | os.PathLike, num_classes: int | None = None,
                unlabelled: int | None = None) -> tuple[np.ndarray, Raster]:
    """Read a label raster: 0 = unlabelled, 1..K = classes. Returns (int32 (rows, cols), raster).

    ``unlabelled`` names another value that means "no label" in this file (MUUFL uses -1).
    """
    raster = read_raster(path)
    if raster.bands != 1:
        raise RasterError(f"{path}: a label raster must have 1 band, found {raster.bands}")
    values = raster.data[0]
    if unlabelled is not None:
        values = np.where(values == unlabelled, 0, values)
    if values.dtype.kind == "f":
        finite = values[np.isfinite(values)]
        if not np.array_equal(finite, np.round(finite)):
            raise RasterError(f"{path}: label values must be whole numbers, found fractional values")
    labels = np.where(raster.valid, np.nan_to_num(values, nan=0), 0).astype(np.int32)
    if raster.nodata is not None and not np.isnan(raster.nodata) and raster.nodata != 0:
        labels[~raster.valid] = 0
    if labels.min() < 0:
        raise RasterError(f"{path}: negative label value {labels.min()} (0 = unlabelled, 1..K = classes)")
    if num_classes is not None and labels.max() > num_classes:
        raise RasterError(f"{path}: label value {labels.max()} is above the number of classes ({num_classes})")
    return labels, raster


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    A crash mid-write leaves the old file (or none), never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make outputs private to their writer
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_geotiff(path: str | os.PathLike, data: np.ndarray, crs=None, transform: Affine | None = None,
                  nodata: float | None = None, colormap: dict[int, Sequence[int]] | None = None,
                  descriptions: Sequence[str] | None = None) -> None:
    """Write (bands, rows, cols) or (rows, cols) ``data`` as a GeoTIFF, atomically."""
    data = data[None] if data.ndim == 2 else data
    profile = dict(driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0],
                   dtype=data.dtype, crs=crs, transform=transform or Affine.identity(), nodata=nodata)
    if data.shape[1] >= 256 and data.shape[2] >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256, compress="deflate")
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(data)
            if colormap is not None:
                dst.write_colormap(1, {int(k): tuple(v) for k, v in colormap.items()})
            if descriptions is not None:
                for i, text in enumerate(descriptions, start=1):
                    dst.set_band_description(i, text)


class GeoTiffWriter:
    """A GeoTIFF written strip by strip (``with`` block), atomically like :func:`write_geotiff`.

    ``count`` bands of ``dtype`` (``float16`` is stored as GDAL's half-precision float32, NBITS=16,
    and reads back as float32), with optional band ``descriptions``, dataset ``tags``, a colour
    table, a GDAL ``scale`` (value x scale = physical value) and ``category_names`` (the label of each pixel value
    from 0, what QGIS shows as the legend
    of a paletted raster; GDAL keeps them in the ``.aux.xml`` sidecar). ``cog``: the finished file
    is a Cloud-Optimised GeoTIFF (GDAL's COG driver, 256-pixel tiles, overviews resampled with
    ``resampling``), copied from the strip-written GeoTIFF so memory stays bounded by GDAL's cache.
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, int], dtype, crs=None,
                 transform: Affine | None = None, nodata: float | None = None,
                 colormap: dict[int, Sequence[int]] | None = None, count: int = 1,
                 descriptions: Sequence[str] | None = None, tags: dict[str, str] | None = None,
                 category_names: Sequence[str] | None = None, scale: float | None = None, cog: bool = False,
                 resampling: str = "nearest"):
        self.path, self.shape, self.colormap, self.count = Path(path), shape, colormap, count
        self.descriptions, self.tags, self.category_names = descriptions, tags, category_names
        self.scale, self.cog, self.resampling = scale, cog, resampling
        self.half = np.dtype(dtype) == np.float16
        self.dtype = np.dtype(np.float32 if self.half else dtype)
        self.profile = dict(driver="GTiff", height=shape[0], width=shape[1], count=count, dtype=self.dtype, crs=crs,
                            transform=transform or Affine.identity(), nodata=nodata)
        if self.half:
            self.profile["nbits"] = 16
        if cog or (shape[0] >= 256 and shape[1] >= 256):
            self.profile.update(tiled=True, blockxsize=256, blockysize=256, compress="deflate")

    def __enter__(self) -> "GeoTiffWriter":
        self._atomic = atomic_path(self.path)
        self._final = self._atomic.__enter__()
        self._staging = self._final.with_name(self._final.name + ".strips.tif") if self.cog else self._final
        self._dst = rasterio.open(self._staging, "w", **self.profile)
        if self.colormap is not None:
            self._dst.write_colormap(1, {int(k): tuple(v) for k, v in self.colormap.items()})
        for i, text in enumerate(self.descriptions or (), start=1):
            self._dst.set_band_description(i, text)
        if self.tags:
            self._dst.update_tags(**self.tags)
        if self.scale is not None:
            self._dst.scales = (self.scale,) * self.count
        return self

    def write(self, rows: np.ndarray, row_offset: int) -> None:
        """Write full-width ``rows``, (h, W) for one band or (count, h, W), starting at ``row_offset``."""
        rows = rows[None] if rows.ndim == 2 else rows
        window = rasterio.windows.Window(0, row_offset, self.shape[1], rows.shape[1])
        self._dst.write(rows.astype(self.dtype, copy=False), window=window)

    def __exit__(self, *exc) -> bool:
        self._dst.close()
        try:
            if exc[0] is None and self.cog:
                options = dict(BLOCKSIZE=256, COMPRESS="DEFLATE", RESAMPLING=self.resampling.upper(),
                               OVERVIEWS="IGNORE_EXISTING")
                if self.half:
                    options["NBITS"] = 16
                rasterio.shutil.copy(self._staging, self._final, driver="COG", **options)
        finally:
            if self._staging != self._final:
                self._staging.unlink(missing_ok=True)
        done = self._atomic.__exit__(*exc)
        if exc[0] is None:
            write_category_names(self.path, self.category_names)
        return done


def write_category_names(path: str | os.PathLike, names: Sequence[str] | None) -> None:
    """Band 1's category names (value 0, 1, ...) in GDAL's ``.aux.xml`` sidecar (GDAL's
    ``GetCategoryNames``, which QGIS uses to label a paletted raster's classes); GeoTIFF has no tag
    for them. Without ``names`` a stale sidecar of an earlier file is removed."""
    from xml.sax.saxutils import escape

    sidecar = Path(f"{path}.aux.xml")
    if not names:
        sidecar.unlink(missing_ok=True)
        return
    categories = "".join(f"      <Category>{escape(str(name))}</Category>\n" for name in names)
    with atomic_path(sidecar) as tmp:
        tmp.write_text(f'<PAMDataset>\n  <PAMRasterBand band="1">\n    <CategoryNames>\n{categories}'
                       "    </CategoryNames>\n  </PAMRasterBand>\n</PAMDataset>\n")


def read_preview(path: str | os.PathLike, max_side: int) -> np.ndarray:
    """Band 1 of a raster, decimated (nearest) so that neither side exceeds ``max_side``."""
    with rasterio.open(path) as src:
        step = max(1, -(-max(src.height, src.width) // max_side))
        shape = (-(-src.height // step), -(-src.width // step))
        return src.read(1, out_shape=shape, resampling=rasterio.enums.Resampling.nearest)
