"""Benchmark files fetched the field's way: through ``rs-fusion-datasets`` (``pip install
"rsfusion[datasets]"``), whose fetch functions download from the datasets' own archives or the mirrors
the papers used, verify every file's SHA-256 and cache them under its data home
(``SCIKIT_LEARN_DATA``, else ``~/scikit_learn_data``). rsfusion then reads the cached files with its own
loaders (``benchmarks.py``), georeferencing included where the files carry it.

What a run logs: the dataset, the fetch function, the URLs, the cache folder, and the size on disk once
fetched; the package prints its own progress. A failed fetch (offline, a dead mirror, a checksum
mismatch) is one line naming the dataset, the URLs tried, the cache folder and how to place the files
by hand. The package verifies every file it returns, so a partial download is never taken as complete;
rsfusion additionally checks that the files it reads are there, and serialises concurrent fetches of one
dataset (DDP ranks) with a lock file.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib
import importlib.metadata
import inspect
import io
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rsfusion.datamodules.errors import InputError
from rsfusion.datamodules.writing import atomic_path

log = logging.getLogger(__name__)
PACKAGE, DISTRIBUTION = "rs_fusion_datasets", "rs-fusion-datasets"
INSTALL = 'pip install "rsfusion[datasets]"'
SOURCE_RECORD = ".rsfusion-source.json"  # beside the cached files: which URL served them, and when


@dataclass(frozen=True)
class Source:
    """Where rs-fusion-datasets fetches one benchmark, and the folder its files land in."""

    dataset: str  # the DataModule's name
    function: str  # the package's fetch function
    cache_folder: str  # the package's folder under its data home
    files_folder: str  # the folder (inside it) that holds the files rsfusion reads: the DataModule's root
    files: tuple[str, ...]  # what rsfusion reads there (checked after every fetch)
    url_parameters: tuple[str, ...] = ("url",)
    terms: str = ""  # shown before the first download
    citations: tuple[str, ...] = field(default_factory=tuple)  # printed at download


HOUSTON2013_TERMS = (
    "Houston2013 (2013 IEEE GRSS Data Fusion Contest) is provided by the University of Houston's Hyperspectral "
    "Image Analysis group and NCALM for research; its terms forbid redistributing the data. Acknowledge the "
    "providers and the IEEE GRSS Data Fusion Technical Committee, and cite Debes et al. 2014 (the archive's "
    "copyright.txt holds the full terms).")
MUUFL_CITATIONS = (
    "P. Gader, A. Zare, R. Close, J. Aitken, G. Tuell, \"MUUFL Gulfport Hyperspectral and LiDAR Airborne Data "
    "Set,\" University of Florida, Gainesville, FL, Tech. Rep. REP-2013-570, Oct. 2013.",
    "X. Du and A. Zare, \"Technical Report: Scene Label Ground Truth Map for MUUFL Gulfport Data Set,\" "
    "University of Florida, Gainesville, FL, Tech. Rep. 20170417, Apr. 2017.")

SOURCES: dict[str, Source] = {s.dataset: s for s in (
    Source("Houston2013", "fetch_houston2013", "houston2013", "2013_DFTC",
           ("2013_IEEE_GRSS_DF_Contest_CASI.tif", "2013_IEEE_GRSS_DF_Contest_LiDAR.tif",
            "2013_IEEE_GRSS_DF_Contest_Samples_TR.txt", "2013_IEEE_GRSS_DF_Contest_Samples_VA.txt"),
           ("url", "url_lbl_val"), terms=HOUSTON2013_TERMS),
    Source("Trento", "fetch_trento", "trento", "Trento-b4afc449ce5d6936ddc04fe267d86f9f35536afd",
           ("Italy_hsi.mat", "Italy_lidar.mat", "allgrd.mat")),
    Source("MUUFL", "fetch_muufl", "muufl", "MUUFLGulfport-0.1/MUUFLGulfportSceneLabels",
           ("muufl_gulfport_campus_1_hsi_220_label.mat",), citations=MUUFL_CITATIONS),
    Source("Augsburg", "fetch_augsburg_ouc", "augsburg-ouc", "Augsburg",
           ("augsburg_hsi.mat", "augsburg_sar.mat", "augsburg_gt.mat", "augsburg_index.mat")),
    Source("Berlin", "fetch_berlin_ouc", "berlin-ouc", "Berlin",
           ("berlin_hsi.mat", "berlin_sar.mat", "berlin_gt.mat", "berlin_index.mat")),
)}

# Benchmarks rs-fusion-datasets does not fetch (DataModule name -> where users get them)
NOT_COVERED = {
    "MS/PAN": "Nanjing, Xi'an and Xi'an Urban come from the MS/PAN classification papers' authors; put ms4.tif, "
              "pan.tif, train.npy and test.npy under root: (docs/datasets.md)",
}


def data_home(home: str | os.PathLike | None = None) -> Path:
    """The package's data home: ``home``, else ``SCIKIT_LEARN_DATA``, else ``~/scikit_learn_data`` (its rule)."""
    if home is None:
        home = os.environ.get("SCIKIT_LEARN_DATA", os.path.join("~", "scikit_learn_data"))
    return Path(home).expanduser()


def files_folder(source: Source, home: str | os.PathLike | None = None) -> Path:
    return data_home(home) / source.cache_folder / source.files_folder


def is_cached(source: Source, home: str | os.PathLike | None = None) -> bool:
    folder = files_folder(source, home)
    return all((folder / name).is_file() for name in source.files)


def package_version() -> str | None:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def _import_package():
    """rs-fusion-datasets 1.0 imports torchvision whenever torch imports (for its own torch datasets), a
    dependency it does not declare; its fetch functions need neither, so it is imported as it would be on a
    machine without torch."""
    if sys.modules.get(PACKAGE) is not None:
        return sys.modules[PACKAGE]
    saved = sys.modules.get("torch")
    sys.modules["torch"] = None  # type: ignore[assignment]  (None in sys.modules: the import raises)
    try:
        return importlib.import_module(PACKAGE)
    finally:
        if saved is not None:
            sys.modules["torch"] = saved
        else:
            del sys.modules["torch"]


def _fetch_function(source: Source):
    try:
        package = _import_package()
    except ImportError:
        raise InputError(f"{source.dataset}: download: true needs rs-fusion-datasets, which is not installed: "
                         f"{INSTALL} (or place the files by hand and give root:; see docs/datasets.md)") from None
    return getattr(package, source.function)


def urls(source: Source, function=None) -> list[str]:
    """The URLs the fetch function tries, read from its own defaults."""
    parameters = inspect.signature(function or _fetch_function(source)).parameters
    found = []
    for name in source.url_parameters:
        default = parameters[name].default if name in parameters else None
        found += [default] if isinstance(default, str) else list(default) if isinstance(default, (list, tuple)) else []
    return found


class _Tee(io.TextIOBase):
    """The package's prints (its progress) pass through to the terminal and are kept (the mirror it used)."""

    def __init__(self, stream):
        self.stream, self.lines = stream, []

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.stream.flush()
        self.lines.append(text)
        return len(text)


def _mirrors_used(printed: str) -> list[str]:
    """The URLs the package reports downloading from, each followed by its success line."""
    used, current = [], None
    for line in re.split(r"[\r\n]+", printed):
        if line.startswith("Downloading "):
            current = line.removeprefix("Downloading ").split(" to ")[0]
        elif line.startswith("Download Success") and current:
            used.append(current)
    return used


def fetch(dataset: str, home: str | os.PathLike | None = None) -> tuple[Path, dict]:
    """The folder holding ``dataset``'s files, fetched (and verified) by rs-fusion-datasets into ``home``
    (default: its data home), and a record of where they came from for the split card."""
    source = SOURCES[dataset]
    function = _fetch_function(source)
    home = data_home(home)
    folder, tried = files_folder(source, home), urls(source, function)
    cached = is_cached(source, home)
    if not cached:
        if source.terms:
            log.warning("%s terms of use: %s", dataset, source.terms)
        log.info("%s: downloading with %s %s (%s) from %s into %s", dataset, DISTRIBUTION, package_version(),
                 source.function, ", ".join(tried), home / source.cache_folder)
    else:
        log.info("%s: found in the cache %s (%s verifies the checksums)", dataset, folder, DISTRIBUTION)
    home.mkdir(parents=True, exist_ok=True)
    tee = _Tee(sys.stdout)
    with open(home / f".{source.cache_folder}.rsfusion.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch of a dataset at a time (DDP ranks, parallel runs)
        try:
            with contextlib.redirect_stdout(tee):
                function(data_home=str(home))
        except Exception as err:  # noqa: BLE001 - the package raises ValueError, AssertionError, OSError...
            first = (str(err).strip().splitlines() or [""])[0][:200]
            raise InputError(
                f"{dataset}: download failed ({type(err).__name__}: {first}); URLs tried: {', '.join(tried)}; "
                f"cache folder: {home / source.cache_folder}; to place the files by hand, put "
                f"{', '.join(source.files)} in a folder and give it as root: with download: false") from None
    missing = [name for name in source.files if not (folder / name).is_file()]
    if missing:
        raise InputError(f"{dataset}: {DISTRIBUTION} returned, but {', '.join(missing)} is not in {folder} (a "
                         f"different package release?); delete {home / source.cache_folder} and fetch again")
    record = _record(source, folder, _mirrors_used("".join(tee.lines)), tried)
    if source.citations:
        log.warning("%s: using this dataset requires citing:\n  %s", dataset, "\n  ".join(source.citations))
    if not cached:
        size = sum(p.stat().st_size for p in (home / source.cache_folder).rglob("*") if p.is_file())
        log.info("%s: %.1f MiB in %s", dataset, size / 2 ** 20, home / source.cache_folder)
    return folder, record


def _record(source: Source, folder: Path, mirrors: list[str], tried: list[str]) -> dict:
    """Which package, function and mirror gave the files: kept beside them, since a later run that finds
    them cached no longer sees the download."""
    path = folder / SOURCE_RECORD
    if mirrors or not path.is_file():
        record = {"package": f"{DISTRIBUTION} {package_version()}", "function": source.function,
                  "mirrors_used": mirrors or None, "urls": tried}
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(record, indent=1))
        return record
    return json.loads(path.read_text())
