"""Tiny faithful copies of the benchmark releases (in the style of TorchGeo's ``tests/data/<dataset>/data.py``).

One function per distributed copy writes, under a folder, the files that copy ships: the same file
names, ``.mat`` keys (MATLAB v5 via scipy, or v7.3 = HDF5 as MATLAB writes it), array orientation
(H, W[, C]), dtypes and label encodings, at a tiny size (the band counts are the real ones). Facts
come from ``shared/data/known-releases.md`` unless a comment names another source. The scenes have
learnable structure: classes are spatial blobs with their own spectra and heights, every class has
training and test pixels.

    python tests/data/releases.py OUT_DIR      # writes every copy into OUT_DIR/<copy>/
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import rasterio
from affine import Affine

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # runnable as a script from anywhere
    sys.path.insert(0, str(ROOT))

from rsfusion.datamodules.synthetic import _regions  # noqa: E402  (the blob generator of the synthetic scenes)

# Tiny scene sizes: never square, so that a transposed array fails loudly.
SHAPES = {"houston2013": (30, 44), "trento": (28, 40), "muufl": (36, 30), "augsburg": (30, 38), "berlin": (40, 30),
          "mspan": (24, 20)}
CLASSES = {"houston2013": 15, "trento": 6, "muufl": 11, "augsburg": 7, "berlin": 8, "mspan": 6}
HOUSTON_TRANSFORM = Affine(2.5, 0.0, 268_000.0, 0.0, -2.5, 3_290_000.0)  # the contest rasters' 2.5 m grid
HOUSTON_NODATA = -3.4e38  # the contest LiDAR's nodata value; no pixel uses it
_MATLAB_CLASS = {"float32": "single", "float64": "double", "uint8": "uint8", "int8": "int8", "uint16": "uint16",
                 "int16": "int16", "int32": "int32", "int64": "int64", "uint32": "uint32"}


# ---------------------------------------------------------------------------------------------- writers
def save_mat(path: Path, arrays: dict[str, np.ndarray], version: str = "5") -> Path:
    """A ``.mat`` file as MATLAB writes it: ``version`` "5" (``save -v7``/scipy) or "7.3" (HDF5).

    MATLAB stores arrays column-major; HDF5 readers (h5py) therefore see every array with its axes
    reversed, an (H, W, C) cube as a (C, W, H) dataset. MATLAB also writes a 512-byte text header
    (the userblock) and a ``MATLAB_class`` attribute per variable: both are reproduced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if version == "5":
        import scipy.io

        scipy.io.savemat(path, arrays, do_compression=False)
        return path
    if version != "7.3":
        raise ValueError(f"MAT version must be '5' or '7.3', got {version!r}")
    import h5py

    with h5py.File(path, "w", userblock_size=512, libver="earliest") as f:
        for key, array in arrays.items():
            array = np.asarray(array)
            dataset = f.create_dataset(key, data=array.T)  # column-major: axes reversed on disk
            dataset.attrs["MATLAB_class"] = np.bytes_(_MATLAB_CLASS[array.dtype.name])
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    header = text.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
    with open(path, "r+b") as f:
        f.write(header.ljust(512, b"\x00"))
    return path


def save_tif(path: Path, data: np.ndarray, transform: Affine | None = None, crs=None, nodata=None) -> Path:
    """A GeoTIFF of (H, W) or (C, H, W) ``data``; no transform = a plain TIFF (identity grid)."""
    data = data[None] if data.ndim == 2 else data
    with warnings.catch_warnings():  # a plain TIFF is what these copies ship: no warning about it
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        _write_tif(path, data, transform, crs, nodata)
    return path


def _write_tif(path, data, transform, crs, nodata) -> None:
    with rasterio.open(path, "w", driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0],
                       dtype=data.dtype, crs=crs, transform=transform or Affine.identity(), nodata=nodata) as dst:
        dst.write(data)


# ---------------------------------------------------------------------------------------------- content
class Scene:
    """A ground-truth map with blob classes, its split and per-class signals for every modality."""

    def __init__(self, dataset: str, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.shape, self.k = SHAPES[dataset], CLASSES[dataset]
        self.gt = self._blobs()
        self.train, self.test = self._split()

    def _blobs(self) -> np.ndarray:
        """Class regions (Voronoi blobs), redrawn until every class covers at least 12 pixels."""
        for _ in range(100):
            gt = _regions(self.shape, self.k, self.rng, cells_per_class=2)
            if np.bincount(gt.ravel(), minlength=self.k + 1)[1:].min() >= 12:
                return gt
        raise RuntimeError(f"{self.shape} is too small for {self.k} classes")

    def _split(self) -> tuple[np.ndarray, np.ndarray]:
        """Per class: ~20 % of its pixels (>= 3) for training, ~60 % for test, the rest unlabelled."""
        train, test = np.zeros_like(self.gt), np.zeros_like(self.gt)
        for k in range(1, self.k + 1):
            pixels = self.rng.permutation(np.flatnonzero(self.gt == k))
            if pixels.size < 5:
                raise RuntimeError(f"class {k} has {pixels.size} pixels: enlarge the scene")
            n_train = max(3, pixels.size // 5)
            n_test = max(2, (pixels.size * 3) // 5)
            train.flat[pixels[:n_train]] = k
            test.flat[pixels[n_train:n_train + n_test]] = k
        return train, test

    def cube(self, bands: int, dtype=np.float32, scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
        """(H, W, bands): a smooth random spectrum per class plus noise."""
        spectra = np.cumsum(self.rng.normal(0, 0.2, size=(self.k, bands)), axis=1) + self.rng.uniform(1, 3, (self.k, 1))
        cube = spectra[self.gt - 1] + self.rng.normal(0, 0.15, size=(*self.shape, bands))
        cube = cube * scale + offset
        if np.dtype(dtype).kind in "iu":
            cube = np.clip(np.round(cube), 0, np.iinfo(dtype).max)
        return cube.astype(dtype)

    def field(self, dtype=np.float32, scale: float = 10.0, offset: float = 0.0) -> np.ndarray:
        """(H, W): a height per class (e.g. a DSM) plus noise."""
        heights = self.rng.uniform(0, 1, self.k)
        return (offset + scale * (heights[self.gt - 1] + self.rng.normal(0, 0.05, self.shape))).astype(dtype)


def _minus_one(labels: np.ndarray, dtype=np.float64) -> np.ndarray:
    """MUUFL's encoding: -1 = unlabelled, 1..K = classes."""
    return np.where(labels > 0, labels.astype(np.int16), -1).astype(dtype)


# ---------------------------------------------------------------------------------------------- copies
def houston2013_mat(root: Path, mat_version: str = "5", lidar_name: str = "LiDAR_1.mat") -> Path:
    """Houston2013 as .mat files: HSI.mat:HSI (144 bands), LiDAR_1.mat (or LiDAR.mat), TRLabel.mat,
    TSLabel.mat (uint8, 0 = unlabelled). The LiDAR key ``LiDAR`` is not checked against a real copy
    (the DataModule reads a single-array file whatever its key)."""
    s = Scene("houston2013")
    save_mat(root / "HSI.mat", {"HSI": s.cube(144, np.float32, 1000.0)}, mat_version)
    save_mat(root / lidar_name, {"LiDAR": s.field(np.float32, 20.0, 5.0)}, mat_version)
    save_mat(root / "TRLabel.mat", {"TRLabel": s.train.astype(np.uint8)}, mat_version)
    save_mat(root / "TSLabel.mat", {"TSLabel": s.test.astype(np.uint8)}, mat_version)
    return root


def houston2013_contest(root: Path) -> Path:
    """Houston2013 with the 2013 contest's GeoTIFFs for LiDAR and labels (float32 DSM on a 2.5 m grid,
    no CRS, nodata -3.4e38 that no pixel uses; uint8 TR/VA sample rasters) and HSI.mat:HSI."""
    s = Scene("houston2013")
    save_mat(root / "HSI.mat", {"HSI": s.cube(144, np.float32, 1000.0)})
    save_tif(root / "2013_IEEE_GRSS_DF_Contest_LiDAR.tif", s.field(np.float32, 20.0, 5.0), HOUSTON_TRANSFORM,
             nodata=HOUSTON_NODATA)
    save_tif(root / "2013_IEEE_GRSS_DF_Contest_Samples_TR.tif", s.train.astype(np.uint8), HOUSTON_TRANSFORM)
    save_tif(root / "2013_IEEE_GRSS_DF_Contest_Samples_VA.tif", s.test.astype(np.uint8), HOUSTON_TRANSFORM)
    return root


def trento(root: Path, mat_version: str = "5") -> Path:
    """Trento: HSI.mat:HSI (63 bands), LiDAR.mat:LiDAR (float32, one band), TRLabel/TSLabel.mat (uint8)."""
    s = Scene("trento")
    save_mat(root / "HSI.mat", {"HSI": s.cube(63, np.float32, 500.0)}, mat_version)
    save_mat(root / "LiDAR.mat", {"LiDAR": s.field(np.float32, 15.0)}, mat_version)
    save_mat(root / "TRLabel.mat", {"TRLabel": s.train.astype(np.uint8)}, mat_version)
    save_mat(root / "TSLabel.mat", {"TSLabel": s.test.astype(np.uint8)}, mat_version)
    return root


def muufl(root: Path, mat_version: str = "5") -> Path:
    """MUUFL with its split: hsi.mat:HSI (64 bands, float32), lidar.mat:lidar (2 bands: elevation,
    intensity), train_test_gt.mat (trainlabels, testlabels; -1 = unlabelled, stored as double)."""
    s = Scene("muufl")
    save_mat(root / "hsi.mat", {"HSI": s.cube(64, np.float32, 0.1)}, mat_version)
    lidar = np.stack([s.field(np.float32, 10.0), s.field(np.float32, 50.0, 20.0)], axis=-1)
    save_mat(root / "lidar.mat", {"lidar": lidar}, mat_version)
    save_mat(root / "train_test_gt.mat", {"trainlabels": _minus_one(s.train), "testlabels": _minus_one(s.test)},
             mat_version)
    return root


def muufl_gt_only(root: Path, mat_version: str = "5") -> Path:
    """MUUFL copies without a split: HSI.mat:HSI, LiDAR.mat:LiDAR (325x220x2 float32 in the real one)
    and gt.mat:gt, the full ground truth (-1 = unlabelled, as in the GatorSense release's labels)."""
    s = Scene("muufl")
    save_mat(root / "HSI.mat", {"HSI": s.cube(64, np.float32, 0.1)}, mat_version)
    lidar = np.stack([s.field(np.float32, 10.0), s.field(np.float32, 50.0, 20.0)], axis=-1)
    save_mat(root / "LiDAR.mat", {"LiDAR": lidar}, mat_version)
    save_mat(root / "gt.mat", {"gt": _minus_one(s.gt)}, mat_version)
    return root


def augsburg_official(root: Path, mat_version: str = "7.3") -> Path:
    """Augsburg, the official HS-SAR-DSM release: data_HS_LR.mat:data_HS_LR (180 bands),
    data_SAR_HR.mat:data_SAR_HR (4), data_DSM.mat:data_DSM (1), TrainImage.mat:TrainImage (uint8),
    TestImage.mat:TestImage (stored as float32). Array keys = file names, as the Berlin copy of the same
    release is read by public loaders (scio.loadmat(name + '.mat')[name]); the MAT version of the
    real files was not checked: both are generated."""
    s = Scene("augsburg")
    save_mat(root / "data_HS_LR.mat", {"data_HS_LR": s.cube(180, np.float64, 0.1)}, mat_version)
    save_mat(root / "data_SAR_HR.mat", {"data_SAR_HR": s.cube(4, np.float64, 0.05)}, mat_version)
    save_mat(root / "data_DSM.mat", {"data_DSM": s.field(np.float64, 30.0, 480.0)}, mat_version)
    save_mat(root / "TrainImage.mat", {"TrainImage": s.train.astype(np.uint8)}, mat_version)
    save_mat(root / "TestImage.mat", {"TestImage": s.test.astype(np.float32)}, mat_version)
    return root


def augsburg_masks(root: Path, mat_version: str = "5") -> Path:
    """Augsburg as redistributed with ``data`` keys: data_hsi.mat:data, data_sar.mat:data,
    mask_train.mat:mask_train, mask_test.mat:mask_test (keys as read by public loaders,
    e.g. ``loadmat('mask_test.mat')['mask_test'].astype(np.uint8)``: the test mask is not uint8)."""
    s = Scene("augsburg")
    save_mat(root / "data_hsi.mat", {"data": s.cube(180, np.float64, 0.1)}, mat_version)
    save_mat(root / "data_sar.mat", {"data": s.cube(4, np.float64, 0.05)}, mat_version)
    save_mat(root / "mask_train.mat", {"mask_train": s.train.astype(np.uint8)}, mat_version)
    save_mat(root / "mask_test.mat", {"mask_test": s.test.astype(np.float64)}, mat_version)
    return root


def berlin_official(root: Path, mat_version: str = "7.3") -> Path:
    """Berlin, the official HS-SAR release: data_HS_LR.mat:data_HS_LR (244 bands, on the SAR grid),
    data_SAR_HR.mat:data_SAR_HR (4), TrainImage.mat, TestImage.mat (keys as public Berlin loaders read
    them: ``scio.loadmat(name + '.mat')[name]``)."""
    s = Scene("berlin")
    save_mat(root / "data_HS_LR.mat", {"data_HS_LR": s.cube(244, np.float64, 0.1)}, mat_version)
    save_mat(root / "data_SAR_HR.mat", {"data_SAR_HR": s.cube(4, np.float64, 0.05)}, mat_version)
    save_mat(root / "TrainImage.mat", {"TrainImage": s.train.astype(np.uint8)}, mat_version)
    save_mat(root / "TestImage.mat", {"TestImage": s.test.astype(np.float32)}, mat_version)
    return root


def berlin_ouc(root: Path, mat_version: str = "5") -> Path:
    """Berlin, the preprocessed (OUC, DCMNet) copy as rs-fusion-datasets reads it (fetch_berlin_ouc):
    berlin_hsi.mat:berlin_hsi (244 bands, float64), berlin_sar.mat:berlin_sar (4), berlin_gt.mat:berlin_gt
    (uint8, the full ground truth) and berlin_index.mat with berlin_train / berlin_test / berlin_all:
    N x 2 (row, col) arrays, 0-based (rs-fusion-datasets indexes berlin_gt with them directly)."""
    s = Scene("berlin")
    save_mat(root / "berlin_hsi.mat", {"berlin_hsi": s.cube(244, np.float64, 0.1)}, mat_version)
    save_mat(root / "berlin_sar.mat", {"berlin_sar": s.cube(4, np.float64, 0.05)}, mat_version)
    save_mat(root / "berlin_gt.mat", {"berlin_gt": s.gt.astype(np.uint8)}, mat_version)
    coords = {name: np.argwhere(labels > 0).astype(np.int64)
              for name, labels in (("berlin_train", s.train), ("berlin_test", s.test), ("berlin_all", s.gt))}
    save_mat(root / "berlin_index.mat", coords, mat_version)
    return root


def mspan(root: Path, ratio: int = 4) -> Path:
    """MS/PAN scenes (Nanjing, Xi'an, ...): ms4.tif (4 bands, uint16), pan.tif (1 band at ``ratio`` x),
    plain TIFFs without georeferencing; train.npy and test.npy label maps (uint8, MS grid, 0 = none)."""
    s = Scene("mspan")
    ms = s.cube(4, np.uint16, 100.0, 200.0)
    pan = np.kron(ms.astype(np.float64).mean(axis=-1), np.ones((ratio, ratio)))
    pan = np.clip(pan + s.rng.normal(0, 5.0, pan.shape), 0, 65535).astype(np.uint16)
    root.mkdir(parents=True, exist_ok=True)
    save_tif(root / "ms4.tif", np.moveaxis(ms, -1, 0))
    save_tif(root / "pan.tif", pan)
    np.save(root / "train.npy", s.train.astype(np.uint8))
    np.save(root / "test.npy", s.test.astype(np.uint8))
    return root


def _v73(fn: Callable) -> Callable[[Path], Path]:
    return lambda root: fn(root, mat_version="7.3")


def _v5(fn: Callable) -> Callable[[Path], Path]:
    return lambda root: fn(root, mat_version="5")


# copy name -> (DataModule class name, writer)
COPIES: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "houston2013_mat": ("Houston2013DataModule", houston2013_mat),
    "houston2013_mat_v73": ("Houston2013DataModule", lambda root: houston2013_mat(root, "7.3", "LiDAR.mat")),
    "houston2013_contest": ("Houston2013DataModule", houston2013_contest),
    "trento": ("TrentoDataModule", trento),
    "trento_v73": ("TrentoDataModule", _v73(trento)),
    "muufl": ("MUUFLDataModule", muufl),
    "muufl_v73": ("MUUFLDataModule", _v73(muufl)),
    "muufl_gt_only": ("MUUFLDataModule", muufl_gt_only),
    "augsburg_official": ("AugsburgDataModule", augsburg_official),
    "augsburg_official_v5": ("AugsburgDataModule", _v5(augsburg_official)),
    "augsburg_masks": ("AugsburgDataModule", augsburg_masks),
    "berlin_official": ("BerlinDataModule", berlin_official),
    "berlin_official_v5": ("BerlinDataModule", _v5(berlin_official)),
    "berlin_ouc": ("BerlinDataModule", berlin_ouc),
    "mspan": ("MSPanDataModule", mspan),
}


def write_copy(name: str, root: Path) -> Path:
    """Write the copy ``name`` into ``root`` (created) and return it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return COPIES[name][1](root)


def expected_maps(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (gt, train, test) maps a copy encodes (0 = unlabelled), for checking what a DataModule reads."""
    dataset = next(d for d in SHAPES if name.startswith(d))
    s = Scene(dataset)
    return s.gt, s.train, s.test


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python tests/data/releases.py OUT_DIR")
    for name in COPIES:
        print(write_copy(name, Path(argv[0]) / name))


if __name__ == "__main__":
    main(sys.argv[1:])
