"""Tiny fake caches of rs-fusion-datasets, laid out as its fetch functions leave them under their data
home (folder and file names, ``.mat`` keys, struct fields and dtypes as its 1.0 code reads them), with the
content of ``releases.Scene``. The package itself would refuse these files (it verifies SHA-256), so tests
pair them with its fetch functions mocked.

    python -m tests.data.rsfd_cache <home> [dataset ...]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from tests.data.releases import HOUSTON_TRANSFORM, Scene, berlin_ouc, save_mat, save_tif

HOUSTON_ROI_NAMES = ["grass_healthy", "grass_stressed", "grass_synthetic", "tree", "soil", "water", "residential",
                     "commercial", "road", "highway", "railway", "parking_lot1", "parking_lot2", "tennis_court",
                     "running_track"]


def envi_roi_text(labels: np.ndarray, names: list[str]) -> str:
    """An ENVI 'Output ROIs to ASCII' export of a label raster: ROI k = class k, 1-based X (column), Y (row)."""
    rows, cols = labels.shape
    lines = ["; ENVI Output of ROIs (4.8) [Thu Mar 14 10:00:00 2013]", f"; Number of ROIs: {len(names)}",
             f"; File Dimension: {cols} x {rows}", ";"]
    points = [np.argwhere(labels == k) for k in range(1, len(names) + 1)]
    for name, pts in zip(names, points):
        lines += [f"; ROI name: {name}", "; ROI rgb value: {255, 0, 0}", f"; ROI npts: {len(pts)}"]
    lines.append(";   ID     X     Y     Map X      Map Y    Lat   Lon    B1")
    for pts in points:
        for i, (r, c) in enumerate(pts, start=1):
            x, y = c + 1, r + 1
            lines.append(f"{i:6d} {x:5d} {y:5d} {268000 + 2.5 * c:10.2f} {3290000 - 2.5 * r:10.2f} 29.7 -95.3 "
                         f"{1000 + i:5d}")
        lines.append("")
    return "\n".join(lines) + "\n"


def houston2013(home: Path) -> Path:
    """``houston2013/2013_DFTC``: the University of Houston archive (CASI and LiDAR GeoTIFFs on the 2.5 m
    grid, no CRS; training and validation samples as ENVI ROI exports)."""
    folder = home / "houston2013" / "2013_DFTC"
    folder.mkdir(parents=True, exist_ok=True)
    s = Scene("houston2013")
    save_tif(folder / "2013_IEEE_GRSS_DF_Contest_CASI.tif", np.moveaxis(s.cube(144, np.uint16, 1000.0), -1, 0),
             HOUSTON_TRANSFORM)
    save_tif(folder / "2013_IEEE_GRSS_DF_Contest_LiDAR.tif", s.field(np.float32, 20.0, 5.0), HOUSTON_TRANSFORM)
    (folder / "2013_IEEE_GRSS_DF_Contest_Samples_TR.txt").write_text(envi_roi_text(s.train, HOUSTON_ROI_NAMES))
    (folder / "2013_IEEE_GRSS_DF_Contest_Samples_VA.txt").write_text(envi_roi_text(s.test, HOUSTON_ROI_NAMES))
    (folder / "copyright.txt").write_text("The data are for research only; do not redistribute.\n")
    return folder


def trento(home: Path) -> Path:
    """``trento/Trento-<commit>``: Italy_hsi.mat:data (H, W, 63), Italy_lidar.mat:data (H, W, 2),
    allgrd.mat:mask_test (the full ground truth, uint8)."""
    folder = home / "trento" / "Trento-b4afc449ce5d6936ddc04fe267d86f9f35536afd"
    s = Scene("trento")
    save_mat(folder / "Italy_hsi.mat", {"data": s.cube(63, np.float64)})
    save_mat(folder / "Italy_lidar.mat", {"data": np.stack([s.field(np.float64), s.field(np.float64)], -1)})
    save_mat(folder / "allgrd.mat", {"mask_test": s.gt.astype(np.uint8)})
    return folder


def muufl(home: Path) -> Path:
    """``muufl/MUUFLGulfport-0.1/MUUFLGulfportSceneLabels``: GatorSense's struct ``hsi`` with ``Data``
    (H, W, 64), ``Lidar`` (a 1 x 2 struct array whose ``z`` is (H, W, 2)), ``sceneLabels.labels`` (-1 =
    unlabelled, 1..11, double) and ``sceneLabels.Materials_Type``."""
    folder = home / "muufl" / "MUUFLGulfport-0.1" / "MUUFLGulfportSceneLabels"
    s = Scene("muufl")
    lidar = np.zeros((1, 2), dtype=[("z", object)])
    for i in range(2):
        lidar[0, i]["z"] = np.stack([s.field(np.float64), s.field(np.float64, 1.0)], -1)
    labels = np.where(s.gt > 0, s.gt, -1).astype(np.float64)
    names = np.array([f"material {k}" for k in range(1, 12)], dtype=object)
    hsi = {"Data": s.cube(64, np.float64, 0.1), "Lidar": lidar,
           "sceneLabels": {"labels": labels, "Materials_Type": names},
           "info": {"wavelength": np.linspace(375.0, 1050.0, 64)}}
    save_mat(folder / "muufl_gulfport_campus_1_hsi_220_label.mat", {"hsi": hsi})
    return folder


def augsburg(home: Path) -> Path:
    """``augsburg-ouc/Augsburg``: augsburg_hsi (uint16, 180), augsburg_sar (float64, 4), augsburg_gt (uint8),
    augsburg_index with augsburg_train / augsburg_test / augsburg_all, 0-based (row, col) lists."""
    folder = home / "augsburg-ouc" / "Augsburg"
    s = Scene("augsburg")
    save_mat(folder / "augsburg_hsi.mat", {"augsburg_hsi": s.cube(180, np.uint16, 1000.0)})
    save_mat(folder / "augsburg_sar.mat", {"augsburg_sar": s.cube(4, np.float64, 0.05)})
    save_mat(folder / "augsburg_gt.mat", {"augsburg_gt": s.gt.astype(np.uint8)})
    save_mat(folder / "augsburg_index.mat", {name: np.argwhere(labels > 0).astype(np.int64) for name, labels in
                                             (("augsburg_train", s.train), ("augsburg_test", s.test),
                                              ("augsburg_all", s.gt))})
    return folder


def berlin(home: Path) -> Path:
    """``berlin-ouc/Berlin``: the OUC copy (``releases.berlin_ouc``)."""
    return berlin_ouc(home / "berlin-ouc" / "Berlin")


CACHES = {"Houston2013": houston2013, "Trento": trento, "MUUFL": muufl, "Augsburg": augsburg, "Berlin": berlin}


if __name__ == "__main__":
    home = Path(sys.argv[1])
    for name in sys.argv[2:] or list(CACHES):
        print(CACHES[name](home))
