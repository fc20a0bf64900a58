"""Label maps from the forms the releases ship them in: rasters/arrays on the scene grid, or N x 2
lists of (row, col) coordinates into a full class raster (e.g. Berlin's preprocessed copy:
``berlin_index.mat:berlin_train`` into ``berlin_gt.mat:berlin_gt``)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rsfusion.datamodules.errors import RasterError
from rsfusion.datamodules.io import RasterHeader, read_header, read_labels, read_raster
from rsfusion.datamodules.scene import check_label_grid


@dataclass
class ClassRaster:
    """A full label map (0 = unlabelled) that coordinate lists take their classes from.

    ``base`` is the index of the first row/column in the lists: 0 (NumPy; the OUC copies, read by
    rs-fusion-datasets as ``gt[coords[:, 0], coords[:, 1]]``) or 1 (lists made in MATLAB).
    """

    path: str
    labels: np.ndarray
    base: int = 0

    @classmethod
    def read(cls, ref: RasterHeader, path: str, num_classes: int | None, unlabelled: int | None,
             base: int = 0) -> "ClassRaster":
        if base not in (0, 1):
            raise RasterError(f"coordinate_base must be 0 or 1, got {base}")
        check_label_grid(ref, path)
        labels, _ = read_labels(path, num_classes, unlabelled)
        return cls(path, labels, base)

    def rasterise(self, path: str, coords: np.ndarray) -> np.ndarray:
        """The label map holding the class raster's label at each (row, col) of ``coords`` (N, 2)."""
        if coords.dtype.kind == "f" and not np.array_equal(coords, np.round(coords)):
            raise RasterError(f"{path}: coordinates must be whole numbers, found fractional values")
        rc = coords.astype(np.int64) - self.base
        h, w = self.labels.shape
        outside = (rc[:, 0] < 0) | (rc[:, 0] >= h) | (rc[:, 1] < 0) | (rc[:, 1] >= w)
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise RasterError(f"{path}: {int(outside.sum())} coordinates fall outside the {h} x {w} scene (first: "
                              f"row {coords[i, 0]}, col {coords[i, 1]}, read as {self.base}-based; "
                              "see coordinate_base)")
        values = self.labels[rc[:, 0], rc[:, 1]]
        if (values == 0).any():
            i = int(np.flatnonzero(values == 0)[0])
            raise RasterError(f"{path}: {int((values == 0).sum())} coordinates point at unlabelled pixels of "
                              f"{self.path} (first: row {coords[i, 0]}, col {coords[i, 1]}, read as {self.base}-based; "
                              "see coordinate_base)")
        out = np.zeros_like(self.labels)
        out[rc[:, 0], rc[:, 1]] = values
        return out


def is_coordinate_list(header: RasterHeader, ref: RasterHeader) -> bool:
    """An (N, 2) array that is not itself a map of the scene."""
    return header.bands == 1 and header.shape[1] == 2 and header.shape != ref.shape


def read_split_labels(ref: RasterHeader, path: str, num_classes: int | None, unlabelled: int | None,
                      class_raster: ClassRaster | None = None) -> np.ndarray:
    """A split's label map (0 = unlabelled, 1..K) from a map on ``ref``'s grid or a coordinate list."""
    header = read_header(path)
    if is_coordinate_list(header, ref):
        if class_raster is None:
            raise RasterError(f"{path}: a {header.shape[0]} x 2 array, not a {ref.shape[0]} x {ref.shape[1]} "
                              "label map: "
                              "if it lists (row, col) coordinates, give class_raster "
                              "(the full label raster they index)")
        return class_raster.rasterise(path, read_raster(path).data[0])
    check_label_grid(ref, path)
    return read_labels(path, num_classes, unlabelled)[0]
