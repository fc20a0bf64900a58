"""DataModules for the standard multimodal benchmark releases: bring the files (``root:``), or let
rs-fusion-datasets fetch them (``download: true``, see ``downloads.py``).

Each class looks for the files of the common distributed copies under ``root`` (the first match of
each role wins; a ``file.mat:KEY`` candidate matches only a file holding that key; a ``.mat`` without
key is read as the file's only array) and otherwise fails with one line listing what it expected.
Class names follow the benchmark papers; labels are 0 = unlabelled, 1..K. On loading, each logs a
split card (input checksums, known-copy check, per-class pixel counts; see ``known_releases``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, ClassVar

from lightning.pytorch.utilities import rank_zero_info

from rsfusion.datamodules.downloads import NOT_COVERED, SOURCES, fetch
from rsfusion.datamodules.errors import InputError, RasterError
from rsfusion.datamodules.io import mat_keys, split_key
from rsfusion.datamodules.known_releases import format_card, split_card
from rsfusion.datamodules.raster import RasterDataModule
from rsfusion.datamodules.writing import atomic_path

Candidates = dict[str, list[str]]
GATORSENSE = "muufl_gulfport_campus_1_hsi_220_label.mat"  # MUUFL as GatorSense releases it
SPLIT_ROLES = ("train", "test", "labels", "class_raster")


class BenchmarkDataModule(RasterDataModule):
    """A :class:`RasterDataModule` whose files are found under ``root`` by their usual names.

    Label roles: ``train`` + ``test`` (an official split; maps, or N x 2 coordinate lists into the
    ``class_raster``), else ``labels`` (a full ground truth without split: divided by the
    RasterDataModule's single-map protocol, spatial blocks by default).

    Args:
        root: the folder holding the dataset's files; with ``download``, the data home to download into
            (default: rs-fusion-datasets' own, ``SCIKIT_LEARN_DATA`` or ``~/scikit_learn_data``).
        use: which modalities to use (default: all the dataset has, in ``files`` order).
        download: fetch the files with rs-fusion-datasets (checksums verified, cached) when the dataset
            is one it covers (``downloads.SOURCES``).
        **kwargs: any :class:`RasterDataModule` option (patch_size, sampling, pca, ...). Options left
            at None take the dataset's ``defaults`` (e.g. MUUFL's ``label_nodata: -1``).
    """

    name: ClassVar[str] = ""
    files: ClassVar[Candidates] = {}
    optional: ClassVar[tuple[str, ...]] = ()
    classes: ClassVar[list[str]] = []
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, root: str | None = None, use: list[str] | None = None, download: bool = False, **kwargs):
        self.source: dict | None = None  # where downloaded files came from (the split card records it)
        if download:
            if self.name not in SOURCES:
                raise InputError(f"{self.name}: download: true is not available, rs-fusion-datasets does not "
                                 f"cover this dataset ({NOT_COVERED.get(self.name, 'see docs/datasets.md')})")
            folder, self.source = fetch(self.name, root)
            root = str(folder)
        elif root is None:
            raise InputError(f"{self.name}: give root: (the folder holding the files) or download: true")
        found = self.locate(root)
        modalities = [r for r in self.files if r not in SPLIT_ROLES]
        wanted = use or [m for m in modalities if m in found]
        unknown = [m for m in wanted if m not in modalities]
        if unknown:
            raise InputError(f"{self.name}: unknown modalities {unknown}; this dataset has {modalities}")
        # The CLI passes every option explicitly (None when not set): defaults apply to None, not to absence.
        for option, value in self.defaults.items():
            if kwargs.get(option) is None:
                kwargs[option] = value
        kwargs["class_names"] = kwargs.get("class_names") or self.classes or None
        if kwargs.get("class_raster") is None and kwargs.get("class_map") is None:
            kwargs["class_raster"] = found.get("class_raster")
        super().__init__(modalities={m: found[m] for m in wanted}, train_labels=found.get("train"),
                         test_labels=found.get("test"), labels=found.get("labels"), **kwargs)
        self.inputs = {**{m: found[m] for m in wanted},
                       **{r: found[r] for r in SPLIT_ROLES if r in found}}
        self.card: dict | None = None

    @classmethod
    def _match(cls, base: Path, candidate: str) -> bool:
        file, key = split_key(base / candidate)
        if not Path(file).is_file():
            return False
        if key is None:
            return True
        try:
            return re.split(r"[.\[]", key)[0] in mat_keys(file)  # a struct field: its variable
        except RasterError:
            return True  # there, but unreadable: reading it reports the problem


    @classmethod
    def locate(cls, root: str) -> dict[str, str]:
        base = Path(root)
        found, missing = {}, []
        for role, candidates in cls.files.items():
            match = next((c for c in candidates if cls._match(base, c)), None)
            if match is not None:
                found[role] = str(base / match)
            elif role not in cls.optional and role not in SPLIT_ROLES:
                missing.append(f"{role}: {' or '.join(c.split(':')[0] for c in candidates)}")
        if "train" in found and "test" in found:
            found.pop("labels", None)  # an official split wins over a full ground truth
        elif "labels" in found:
            found.pop("train", None), found.pop("test", None)
        else:
            alternatives = [f"{r}: {' or '.join(c.split(':')[0] for c in cls.files[r])}"
                            for r in ("train", "test") if r in cls.files and r not in found]
            if "labels" in cls.files:
                full = " or ".join(c.split(":")[0] for c in cls.files["labels"])
                alternatives[-1] += f" (or a full ground truth: {full})"
            missing += alternatives
        if missing:
            raise InputError(f"{base}: {cls.name} files not found ({'; '.join(missing)})")
        return found

    def setup(self, stage: str | None = None) -> None:
        if self.card is None:
            self.log_split_card()
        super().setup(stage)

    def log_split_card(self) -> dict:
        """Log (rank 0) the split card, and write it as ``split_card.json`` in the trainer's log dir."""
        self.card = split_card(self.name, self.inputs, self.label_rasters, self.class_names)
        if self.source is not None:
            self.card["source"] = self.source
        rank_zero_info(format_card(self.card))
        trainer = getattr(self, "trainer", None)
        log_dir = trainer.log_dir if trainer is not None else None  # a collective under DDP: every rank asks
        if log_dir and trainer.is_global_zero:
            with atomic_path(Path(log_dir) / "split_card.json") as tmp:
                tmp.write_text(json.dumps(self.card, indent=1))
        return self.card


class Houston2013DataModule(BenchmarkDataModule):
    """Houston2013 (DFC2013, UH campus, 349x1905): HSI 144 bands + LiDAR DSM; 15 classes, official
    spatially disjoint split (2,832 train / 12,197 test). Copies: ``HSI.mat``, ``LiDAR_1.mat`` or
    ``LiDAR.mat``, ``TRLabel.mat``/``TSLabel.mat``; or the contest GeoTIFFs (CASI, LiDAR, Samples_TR/VA:
    2.5 m transform, no CRS), which maps then inherit; the University of Houston's archive (what
    ``download: true`` fetches) has the samples as ENVI ROI exports (``Samples_TR.txt``/``_VA.txt``)."""

    name = "Houston2013"
    files = {"hsi": ["HSI.mat:HSI", "2013_IEEE_GRSS_DF_Contest_CASI.tif", "houston_hsi.tif", "HSI.tif"],
             "lidar": ["LiDAR_1.mat", "LiDAR.mat", "2013_IEEE_GRSS_DF_Contest_LiDAR.tif", "houston_lidar.tif",
                       "LiDAR.tif"],
             "train": ["TRLabel.mat:TRLabel", "2013_IEEE_GRSS_DF_Contest_Samples_TR.tif",
                       "2013_IEEE_GRSS_DF_Contest_Samples_TR.txt", "TRLabel.tif", "train.tif"],
             "test": ["TSLabel.mat:TSLabel", "2013_IEEE_GRSS_DF_Contest_Samples_VA.tif",
                      "2013_IEEE_GRSS_DF_Contest_Samples_VA.txt", "TSLabel.tif", "test.tif"]}
    classes = ["Healthy grass", "Stressed grass", "Synthetic grass", "Trees", "Soil", "Water", "Residential",
               "Commercial", "Road", "Highway", "Railway", "Parking lot 1", "Parking lot 2", "Tennis court",
               "Running track"]


class TrentoDataModule(BenchmarkDataModule):
    """Trento (166x600): HSI 63 bands + LiDAR (1 or 2 rasters by copy); 6 classes, 819 / 29,395. Copies:
    ``HSI.mat``, ``LiDAR.mat``, ``TRLabel.mat``/``TSLabel.mat``; or the copy ``download: true`` fetches,
    ``Italy_hsi.mat:data``, ``Italy_lidar.mat:data`` (2 rasters) and one ground truth ``allgrd.mat:mask_test``
    without split (the single-map protocol divides it: spatial blocks, or ``train_per_class``)."""

    name = "Trento"
    files = {"hsi": ["HSI.mat:HSI", "Italy_hsi.mat:data", "HSI.tif"],
             "lidar": ["LiDAR.mat:LiDAR", "Italy_lidar.mat:data", "LiDAR.tif"],
             "train": ["TRLabel.mat:TRLabel", "TRLabel.tif", "train.tif"],
             "test": ["TSLabel.mat:TSLabel", "TSLabel.tif", "test.tif"],
             "labels": ["allgrd.mat:mask_test"]}
    classes = ["Apple trees", "Buildings", "Ground", "Woods", "Vineyard", "Roads"]


class MUUFLDataModule(BenchmarkDataModule):
    """MUUFL Gulfport (325x220): HSI 64 bands + LiDAR 2 rasters; 11 classes (raw label -1 = unlabelled).
    Copies: ``hsi.mat:HSI``, ``lidar.mat:lidar``, ``train_test_gt.mat`` (trainlabels/testlabels); or
    ``HSI.mat:HSI``, ``LiDAR.mat:LiDAR`` with only ``gt.mat:gt`` (no split: the single-map protocol
    divides it, e.g. ``train_per_class``, or spatial blocks by default); or GatorSense's release
    (``download: true``): the struct ``hsi`` of ``muufl_gulfport_campus_1_hsi_220_label.mat`` (``Data``,
    ``Lidar[0].z``, ``sceneLabels.labels``; no split)."""

    name = "MUUFL"
    files = {"hsi": ["hsi.mat:HSI", "HSI.mat:HSI", f"{GATORSENSE}:hsi.Data"],
             "lidar": ["lidar.mat:lidar", "LiDAR.mat:LiDAR", f"{GATORSENSE}:hsi.Lidar[0].z"],
             "train": ["train_test_gt.mat:trainlabels", "train.tif"],
             "test": ["train_test_gt.mat:testlabels", "test.tif"],
             "labels": ["gt.mat:gt", f"{GATORSENSE}:hsi.sceneLabels.labels"]}
    classes = ["Trees", "Mostly grass", "Mixed ground surface", "Dirt/sand", "Road", "Water", "Building shadow",
               "Building", "Sidewalk", "Yellow curb", "Cloth panels"]
    defaults = {"label_nodata": -1}


class AugsburgDataModule(BenchmarkDataModule):
    """Augsburg (332x485): HSI 180 bands + Sentinel-1 SAR 4 (+ DSM 1 in the 3-modal release); 7 classes,
    disjoint maps 761 train / 77,533 test. ``use: [hsi, sar]`` for the 2-modal setting. Copies: the
    official ``data_HS_LR.mat``, ``data_SAR_HR.mat``, ``data_DSM.mat``, ``TrainImage.mat``,
    ``TestImage.mat`` (stored as float32: read as whole-number labels); or ``data_hsi.mat:data``,
    ``data_sar.mat:data``, ``mask_train.mat``, ``mask_test.mat``; or the preprocessed (OUC) copy that
    ``download: true`` fetches, ``augsburg_hsi.mat``, ``augsburg_sar.mat``, and 0-based (row, col) lists
    ``augsburg_index.mat`` (``augsburg_train``/``augsburg_test``) into ``augsburg_gt.mat``."""

    name = "Augsburg"
    files = {"hsi": ["data_HS_LR.mat:data_HS_LR", "data_hsi.mat:data", "augsburg_hsi.mat:augsburg_hsi", "hsi.tif"],
             "sar": ["data_SAR_HR.mat:data_SAR_HR", "data_sar.mat:data", "augsburg_sar.mat:augsburg_sar", "sar.tif"],
             "dsm": ["data_DSM.mat:data_DSM", "data_DSM.mat:data", "dsm.tif"],
             "train": ["TrainImage.mat:TrainImage", "mask_train.mat:mask_train", "augsburg_index.mat:augsburg_train",
                       "train.tif"],
             "test": ["TestImage.mat:TestImage", "mask_test.mat:mask_test", "augsburg_index.mat:augsburg_test",
                      "test.tif"],
             "class_raster": ["augsburg_gt.mat:augsburg_gt"]}
    optional = ("dsm",)
    classes = ["Forest", "Residential area", "Industrial area", "Low plants", "Allotment", "Commercial area", "Water"]


class BerlinDataModule(BenchmarkDataModule):
    """Berlin (1723x476): HSI 244 bands (EnMAP simulation) + Sentinel-1 SAR 4; 8 classes. Copies: the
    official ``data_HS_LR.mat``, ``data_SAR_HR.mat``, ``TrainImage.mat``, ``TestImage.mat`` (disjoint
    maps); or the preprocessed (OUC) ``berlin_hsi.mat``, ``berlin_sar.mat``, ``berlin_gt.mat`` and
    ``berlin_index.mat`` whose ``berlin_train``/``berlin_test`` are 0-based (row, col) lists into
    ``berlin_gt``."""

    name = "Berlin"
    files = {"hsi": ["data_HS_LR.mat:data_HS_LR", "berlin_hsi.mat:berlin_hsi", "hsi.tif"],
             "sar": ["data_SAR_HR.mat:data_SAR_HR", "berlin_sar.mat:berlin_sar", "sar.tif"],
             "train": ["TrainImage.mat:TrainImage", "berlin_index.mat:berlin_train", "train.tif"],
             "test": ["TestImage.mat:TestImage", "berlin_index.mat:berlin_test", "test.tif"],
             "class_raster": ["berlin_gt.mat:berlin_gt"]}
    classes = ["Forest", "Residential area", "Industrial area", "Low plants", "Soil", "Allotment",
               "Commercial area", "Water"]


class MSPanDataModule(BenchmarkDataModule):
    """MS (4 bands) + PAN (4x) scenes in the layout of the MS/PAN literature (Nanjing, Xi'an, ...):
    ``ms4.tif``, ``pan.tif``, ``train.npy``, ``test.npy`` (labels at MS resolution). Class count from
    the maps; pass ``class_names`` to name them."""

    name = "MS/PAN"
    files = {"ms": ["ms4.tif"], "pan": ["pan.tif"], "train": ["train.npy", "train.tif"],
             "test": ["test.npy", "test.tif"]}
    defaults = {"allow_even_patch": True}  # 16 x 16 MS patches are the literature's convention
