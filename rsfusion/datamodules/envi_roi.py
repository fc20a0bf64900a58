"""Label rasters from ENVI's ASCII export of regions of interest (``.txt``), the form in which the
2013 GRSS Data Fusion Contest archive ships Houston2013's training and validation samples.

The export starts with ``;`` comment lines: ``; File Dimension: <columns> x <rows>``, then for every ROI
its ``; ROI name:`` and ``; ROI npts: N``. The points follow, ROI after ROI, one per line: ``ID X Y ...``
with 1-based pixel columns X and rows Y (the ID restarts at 1 for each ROI). ROI k becomes class k.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from rsfusion.datamodules.errors import RasterError

_DIMENSION = re.compile(r";\s*File Dimension\s*:\s*(\d+)\s*x\s*(\d+)", re.I)
_NPTS = re.compile(r";\s*ROI npts\s*:\s*(\d+)", re.I)
_NAME = re.compile(r";\s*ROI name\s*:\s*(.*)", re.I)


def is_envi_roi(path: str | Path) -> bool:
    path = Path(path)
    if path.suffix.lower() != ".txt" or not path.is_file():
        return False
    with path.open(errors="replace") as handle:
        return "ENVI" in handle.readline() or bool(_DIMENSION.search(handle.read(4096)))


def roi_shape(path: str | Path) -> tuple[int, int]:
    """(rows, columns) of the image the ROIs were drawn on, from the export's header."""
    with Path(path).open(errors="replace") as handle:
        for line in handle:
            if not line.startswith(";"):
                break
            match = _DIMENSION.match(line.strip())
            if match:
                return int(match.group(2)), int(match.group(1))
    raise RasterError(f"{path}: not an ENVI ROI export (no '; File Dimension: <columns> x <rows>' header line)")


def read_roi(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """The (rows, columns) label raster (0 = unlabelled, ROI k = class k) and the ROI names."""
    path = Path(path)
    rows, cols = roi_shape(path)
    names, counts, points = [], [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        text = line.strip()
        if text.startswith(";"):
            if match := _NAME.match(text):
                names.append(match.group(1).strip())
            elif match := _NPTS.match(text):
                counts.append(int(match.group(1)))
            continue
        if not text:
            continue
        fields = text.split()
        try:
            points.append((int(fields[1]), int(fields[2])))
        except (IndexError, ValueError):
            raise RasterError(f"{path}: line {number} is not 'ID X Y ...': {text[:60]!r}") from None
    if not counts or sum(counts) != len(points):
        raise RasterError(f"{path}: the header announces {sum(counts)} points in {len(counts)} ROIs, the file lists "
                          f"{len(points)}")
    labels = np.zeros((rows, cols), dtype=np.uint8 if len(counts) < 256 else np.uint16)
    xy = np.asarray(points, dtype=np.int64) - 1  # 1-based in the export
    outside = (xy[:, 0] < 0) | (xy[:, 0] >= cols) | (xy[:, 1] < 0) | (xy[:, 1] >= rows)
    if outside.any():
        x, y = points[int(np.flatnonzero(outside)[0])]
        raise RasterError(f"{path}: {int(outside.sum())} points lie outside the {cols} x {rows} image (first: X {x}, "
                          f"Y {y})")
    classes = np.repeat(np.arange(1, len(counts) + 1), counts)
    for (x, y), k in zip(xy, classes):
        if labels[y, x] not in (0, k):
            raise RasterError(f"{path}: pixel X {x + 1}, Y {y + 1} belongs to two ROIs ({labels[y, x]} and {k})")
        labels[y, x] = k
    return labels, names
