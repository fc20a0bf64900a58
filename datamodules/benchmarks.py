"""DataModules for the standard multimodal benchmark releases (files are not downloadable: bring them).

Each class looks for the files of the common distributed copies under ``root`` (the first match of
each role wins; ``.mat`` arrays are found by key, or as the file's only array) and otherwise fails
with one line listing what it expected. Class names follow the benchmark papers; labels are
0 = unlabelled, 1..K.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from rsfusion.datamodules.io import InputError
from rsfusion.datamodules.raster import RasterDataModule

Candidates = dict[str, list[str]]


class BenchmarkDataModule(RasterDataModule):
    """A :class:`RasterDataModule` whose files are found under ``root`` by their usual names.

    Args:
        root: the folder holding the dataset's files.
        use: which modalities to use (default: all the dataset has, in ``files`` order).
        **kwargs: any :class:`RasterDataModule` option (patch_size, sampling, pca, ...).
    """

    name: ClassVar[str] = ""
    files: ClassVar[Candidates] = {}
    optional: ClassVar[tuple[str, ...]] = ()
    classes: ClassVar[list[str]] = []

    def __init__(self, root: str, use: list[str] | None = None, **kwargs):
        found = self.locate(root)
        modalities = [r for r in self.files if r not in ("train", "test")]
        wanted = use or [m for m in modalities if m in found]
        unknown = [m for m in wanted if m not in modalities]
        if unknown:
            raise InputError(f"{self.name}: unknown modalities {unknown}; this dataset has {modalities}")
        kwargs["class_names"] = kwargs.get("class_names") or self.classes or None
        super().__init__(modalities={m: found[m] for m in wanted}, train_labels=found["train"],
                         test_labels=found["test"], **kwargs)

    @classmethod
    def locate(cls, root: str) -> dict[str, str]:
        base = Path(root)
        found, missing = {}, []
        for role, candidates in cls.files.items():
            for candidate in candidates:
                file = candidate.split(":")[0]
                if (base / file).exists():
                    found[role] = str(base / candidate)
                    break
            else:
                if role not in cls.optional:
                    missing.append(f"{role}: {' or '.join(c.split(':')[0] for c in candidates)}")
        if missing:
            raise InputError(f"{base}: {cls.name} files not found ({'; '.join(missing)})")
        return found


class Houston2013DataModule(BenchmarkDataModule):
    """Houston2013 (DFC2013, UH campus, 349x1905): HSI 144 bands + LiDAR DSM; 15 classes, official
    spatially disjoint split (2,832 train / 12,197 test)."""

    name = "Houston2013"
    files = {"hsi": ["HSI.mat:HSI", "houston_hsi.tif", "HSI.tif"], "lidar": ["LiDAR_1.mat:LiDAR", "LiDAR.mat:LiDAR",
                                                                              "houston_lidar.tif", "LiDAR.tif"],
             "train": ["TRLabel.mat:TRLabel", "TRLabel.tif", "train.tif"],
             "test": ["TSLabel.mat:TSLabel", "TSLabel.tif", "test.tif"]}
    classes = ["Healthy grass", "Stressed grass", "Synthetic grass", "Trees", "Soil", "Water", "Residential",
               "Commercial", "Road", "Highway", "Railway", "Parking lot 1", "Parking lot 2", "Tennis court",
               "Running track"]


class TrentoDataModule(BenchmarkDataModule):
    """Trento (166x600): HSI 63 bands + LiDAR (1 or 2 rasters by copy); 6 classes, 819 / 29,395."""

    name = "Trento"
    files = {"hsi": ["HSI.mat:HSI", "HSI.tif"], "lidar": ["LiDAR.mat:LiDAR", "LiDAR.tif"],
             "train": ["TRLabel.mat:TRLabel", "TRLabel.tif", "train.tif"],
             "test": ["TSLabel.mat:TSLabel", "TSLabel.tif", "test.tif"]}
    classes = ["Apple trees", "Buildings", "Ground", "Woods", "Vineyard", "Roads"]


class MUUFLDataModule(BenchmarkDataModule):
    """MUUFL Gulfport (325x220): HSI 64 bands + LiDAR 2 rasters; 11 classes (raw label -1 = unlabelled)."""

    name = "MUUFL"
    files = {"hsi": ["hsi.mat:HSI", "HSI.mat:HSI"], "lidar": ["lidar.mat:lidar", "LiDAR.mat:LiDAR"],
             "train": ["train_test_gt.mat:trainlabels", "train.tif"],
             "test": ["train_test_gt.mat:testlabels", "test.tif"]}
    classes = ["Trees", "Mostly grass", "Mixed ground surface", "Dirt/sand", "Road", "Water", "Building shadow",
               "Building", "Sidewalk", "Yellow curb", "Cloth panels"]

    def __init__(self, root: str, use: list[str] | None = None, **kwargs):
        kwargs.setdefault("label_nodata", -1)
        super().__init__(root, use, **kwargs)


class AugsburgDataModule(BenchmarkDataModule):
    """Augsburg (332x485): HSI 180 bands + Sentinel-1 SAR 4 (+ DSM 1 in the 3-modal release); 7 classes,
    disjoint maps 761 train / 77,533 test. ``use: [hsi, sar]`` for the 2-modal setting."""

    name = "Augsburg"
    files = {"hsi": ["data_hsi.mat:data", "data_HS_LR.mat", "hsi.tif"], "sar": ["data_sar.mat:data",
                                                                             "data_SAR_HR.mat", "sar.tif"],
             "dsm": ["data_DSM.mat:data", "data_DSM.mat", "dsm.tif"],
             "train": ["mask_train.mat:mask_train", "TrainImage.mat", "train.tif"],
             "test": ["mask_test.mat:mask_test", "TestImage.mat", "test.tif"]}
    optional = ("dsm",)
    classes = ["Forest", "Residential area", "Industrial area", "Low plants", "Allotment", "Commercial area", "Water"]


class BerlinDataModule(BenchmarkDataModule):
    """Berlin (1723x476): HSI 244 bands (EnMAP simulation) + Sentinel-1 SAR 4; 8 classes, disjoint maps."""

    name = "Berlin"
    files = {"hsi": ["data_HS_LR.mat", "berlin_hsi.mat", "hsi.tif"], "sar": ["data_SAR_HR.mat", "berlin_sar.mat",
                                                                            "sar.tif"],
             "train": ["TrainImage.mat", "train.tif"], "test": ["TestImage.mat", "test.tif"]}
    classes = ["Forest", "Residential area", "Industrial area", "Low plants", "Soil", "Allotment",
               "Commercial area", "Water"]


class MSPanDataModule(BenchmarkDataModule):
    """MS (4 bands) + PAN (4x) scenes in the layout of the MS/PAN literature (Nanjing, Xi'an, ...):
    ``ms4.tif``, ``pan.tif``, ``train.npy``, ``test.npy`` (labels at MS resolution). Class count from
    the maps; pass ``class_names`` to name them."""

    name = "MS/PAN"
    files = {"ms": ["ms4.tif"], "pan": ["pan.tif"], "train": ["train.npy", "train.tif"],
             "test": ["test.npy", "test.tif"]}

    def __init__(self, root: str, **kwargs):
        if kwargs.get("allow_even_patch") is None:  # 16 x 16 MS patches are the literature's convention
            kwargs["allow_even_patch"] = True
        super().__init__(root, **kwargs)
