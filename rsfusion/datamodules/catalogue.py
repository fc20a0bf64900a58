"""The benchmarks rsfusion reads: modalities, size, classes, licence, citations, where the files come
from. ``rsfusion datasets`` prints it; docs/datasets.md holds the same facts with more words."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rsfusion.datamodules.downloads import MUUFL_CITATIONS, NOT_COVERED, SOURCES

HONG_2021 = ("D. Hong, J. Hu, J. Yao, J. Chanussot, X. X. Zhu, \"Multimodal remote sensing benchmark datasets for "
             "land cover classification with a shallow-deep fusion network,\" ISPRS J. Photogramm. Remote Sens., "
             "vol. 178, pp. 68-80, 2021.")
DEBES_2014 = ("C. Debes et al., \"Hyperspectral and LiDAR Data Fusion: Outcome of the 2013 GRSS Data Fusion "
              "Contest,\" IEEE J. Sel. Topics Appl. Earth Observ. Remote Sens., vol. 7, no. 6, pp. 2405-2418, 2014.")


@dataclass(frozen=True)
class Dataset:
    name: str
    datamodule: str
    modalities: str  # with band counts
    size: str  # rows x columns of the reference grid
    classes: int
    licence: str
    citations: tuple[str, ...]
    source: str  # where the files come from (for download: true, the package's function)


DATASETS: list[Dataset] = [
    Dataset("Houston2013", "Houston2013DataModule", "HSI 144, LiDAR DSM 1", "349 x 1905", 15,
            "GRSS DFC 2013 terms: research use, no redistribution", (DEBES_2014,),
            "University of Houston archive (rs-fusion-datasets fetch_houston2013)"),
    Dataset("Trento", "TrentoDataModule", "HSI 63, LiDAR 2 (1 in other copies)", "166 x 600", 6,
            "none published by the mirror", (),
            "GitHub mirror tyust-dayu/Trento (fetch_trento); no official split in it"),
    Dataset("MUUFL", "MUUFLDataModule", "HSI 64, LiDAR 2", "325 x 220", 11, "MIT (GatorSense repository)",
            MUUFL_CITATIONS, "GatorSense/MUUFLGulfport v0.1 (fetch_muufl); no official split in it"),
    Dataset("Augsburg", "AugsburgDataModule", "HSI 180, SAR 4 (+ DSM 1 in the official release)", "332 x 485", 7,
            "see the TUM release", (HONG_2021,), "OUC-preprocessed copy (fetch_augsburg_ouc)"),
    Dataset("Berlin", "BerlinDataModule", "HSI 244, SAR 4", "1723 x 476", 8, "see the TUM release", (HONG_2021,),
            "OUC-preprocessed copy (fetch_berlin_ouc)"),
    Dataset("Nanjing, Xi'an, Xi'an Urban", "MSPanDataModule", "MS 4, PAN 1 (4x)", "varies by copy", 0,
            "as given by each copy's distributor", (), "by hand: " + NOT_COVERED["MS/PAN"]),
    Dataset("Yellow River Estuary, LCZ HK", "RasterDataModule", "per the release (BDGF templates)", "-", 0,
            "as given by each release", (), "by hand: not covered by rs-fusion-datasets (configs/*_template.yaml)"),
]


def source_of(dataset: Dataset):
    """The rs-fusion-datasets source of a dataset, if ``download: true`` can fetch it."""
    return SOURCES.get(dataset.name)


def configs_using(dataset: Dataset, configs: Path) -> list[str]:
    """The config files (stems) under ``configs`` whose data class is this dataset's DataModule."""
    if dataset.datamodule == "RasterDataModule":
        return sorted(p.stem for p in configs.glob("*_template.yaml"))
    pattern = re.compile(rf"class_path:\s*(\S+\.)?{dataset.datamodule}\b")
    return sorted(p.stem for p in configs.glob("*.yaml") if pattern.search(p.read_text()))
