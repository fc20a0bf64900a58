"""Reading rasters: GeoTIFF and anything GDAL reads, ``.npy``, ``.mat`` (v5 and v7.3; ``file.mat:KEY``, or a
field of a MATLAB struct: ``file.mat:hsi.Lidar[0].z``), label maps, ENVI ROI exports (``.txt``).

Every reading problem becomes a one-line :class:`~rsfusion.datamodules.errors.RasterError` that names
the file and the problem.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import rasterio
import rasterio.enums
import rasterio.windows
import scipy.io
from affine import Affine
from rasterio.errors import RasterioError, RasterioIOError

from rsfusion.datamodules.envi_roi import is_envi_roi, read_roi, roi_shape
from rsfusion.datamodules.errors import RasterError

LABEL_KEYS = ("label", "labels", "gt", "TRLabel", "TSLabel", "mask_train", "mask_test",
              "trainlabels", "testlabels", "TrainImage", "TestImage")
# rasterio < 1.4 raises RasterioIOError (an OSError) for files GDAL cannot open, outside RasterioError
RASTERIO_ERRORS = (RasterioError, RasterioIOError)
GDAL_SUFFIXES = {".tif", ".tiff", ".img", ".vrt", ".jp2", ".hdr", ".dat", ".bsq", ".bil", ".bip", ".nc"}


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


def _struct_field(path: Path, key: str) -> np.ndarray:
    """``hsi.Lidar[0].z``: a field of a struct in a MATLAB v5 file."""
    parts = re.findall(r"([A-Za-z_]\w*)(?:\[(\d+)\])?", key)
    if h5py.is_hdf5(path):
        raise RasterError(f"{path}: struct fields ({key}) are read from MATLAB v5 files only; this is v7.3")
    try:
        value = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False, variable_names=[parts[0][0]])
    except Exception as err:  # noqa: BLE001 (scipy raises many kinds)
        raise RasterError(f"{path}: cannot read .mat file ({type(err).__name__}: {_first_line(err)})") from None
    walked = ""
    for name, index in parts:
        try:
            value = value[name] if isinstance(value, dict) else getattr(value, name)
            value = value if index == "" else np.atleast_1d(value)[int(index)]
        except (KeyError, AttributeError, IndexError):
            raise RasterError(f"{path}: no {walked + name}{f'[{index}]' if index else ''} in the .mat file "
                              f"(key {key!r})") from None
        walked += f"{name}{f'[{index}]' if index else ''}."
    if not isinstance(value, np.ndarray) or value.dtype == object:
        raise RasterError(f"{path}: {key} is not a numeric array")
    return value


def _load_mat(path: Path, key: str | None) -> np.ndarray:
    if key is not None and ("." in key or "[" in key):
        return _struct_field(path, key)
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
    if is_envi_roi(p):
        return RasterHeader(str(path), 1, roi_shape(p))
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
        if suffix == ".mat":
            array = _load_mat(p, key)  # its errors name the file already
        else:
            try:
                array = np.load(p, mmap_mode="r")
            except (ValueError, OSError, EOFError) as err:  # EOFError: a 0-byte file
                raise RasterError(f"{p}: cannot read .npy file ({err})") from None
        data = np.ascontiguousarray(_to_chw(array, p, channels_last=True)[:, rows, cols])
    elif is_envi_roi(p):
        data = np.ascontiguousarray(read_roi(p)[0][None, rows, cols])
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


def read_preview(path: str | os.PathLike, max_side: int) -> np.ndarray:
    """Band 1 of a raster, decimated (nearest) so that neither side exceeds ``max_side``."""
    with rasterio.open(path) as src:
        step = max(1, -(-max(src.height, src.width) // max_side))
        shape = (-(-src.height // step), -(-src.width // step))
        return src.read(1, out_shape=shape, resampling=rasterio.enums.Resampling.nearest)
