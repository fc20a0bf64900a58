"""Writing outputs atomically: any file (:func:`atomic_path`) and GeoTIFFs, whole or strip by strip.

A crash mid-write leaves the old file (or none), never a truncated one.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import rasterio.shutil
import rasterio.windows
from affine import Affine


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
    sidecar = Path(f"{path}.aux.xml")
    if not names:
        sidecar.unlink(missing_ok=True)
        return
    categories = "".join(f"      <Category>{escape(str(name))}</Category>\n" for name in names)
    with atomic_path(sidecar) as tmp:
        tmp.write_text(f'<PAMDataset>\n  <PAMRasterBand band="1">\n    <CategoryNames>\n{categories}'
                       "    </CategoryNames>\n  </PAMRasterBand>\n</PAMDataset>\n")
