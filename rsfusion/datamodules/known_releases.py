"""Known public copies of the benchmark files, and the split card a benchmark DataModule logs.

The checksums and facts come from ``shared/data/known-releases.md`` (public copies checked by the
project; "same as rs-fusion-datasets" where that loader publishes the same checksum). A file whose
SHA-256 is listed is reported as that known copy; any other file as an unknown copy (a different
redistribution, a re-save, or a modified file: the card's counts say which split it holds).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rsfusion.datamodules.io import split_key


@dataclass(frozen=True)
class KnownFile:
    dataset: str
    name: str
    key: str | None
    shape: tuple[int, ...]
    dtype: str
    labelled: int | None  # labelled pixels of a label file
    note: str = ""

    def describe(self) -> str:
        key = f":{self.key}" if self.key else ""
        labelled = f", {self.labelled:,} labelled" if self.labelled is not None else ""
        return f"{self.dataset} {self.name}{key} ({' x '.join(map(str, self.shape))} {self.dtype}{labelled})"


KNOWN_FILES: dict[str, KnownFile] = {
    "d99347532e7b18982c9537fd4de43574dd64f9b35ccab251459e7b483ddd43df":
        KnownFile("Trento", "LiDAR.mat", "LiDAR", (166, 600), "float32", None, "same as rs-fusion-datasets"),
    "593976a1bef4edf06ec543926811509f997454557aa9313ed6165b3012c26e07":
        KnownFile("Trento", "TRLabel.mat", "TRLabel", (166, 600), "uint8", 819, "same as rs-fusion-datasets"),
    "629ae33464907098cacf58549996711bf7079f036946f9208fde8a67842ab499":
        KnownFile("Trento", "TSLabel.mat", "TSLabel", (166, 600), "uint8", 29_395, "same as rs-fusion-datasets"),
    "b0ea556a4a05176f4aeccadf3aee51fee35f70365fdaa810aab85190a41aa7fc":
        KnownFile("Houston2013", "TRLabel.mat", "TRLabel", (349, 1905), "uint8", 2_832,
                  "pixel-identical to the contest TR raster"),
    "43759d8fd94f0030800238eca04e097a22865b1b396ddb8116b635ade5c301ce":
        KnownFile("Houston2013", "TSLabel.mat", "TSLabel", (349, 1905), "uint8", 12_197,
                  "pixel-identical to the contest VA raster"),
    "9f4facce8876ee84642d9cb03536baf0389506de97ddc01b73366fe4521de981":
        KnownFile("Houston2013", "2013_IEEE_GRSS_DF_Contest_LiDAR.tif", None, (349, 1905), "float32", None,
                  "official contest file (2.5 m transform, no CRS); same as rs-fusion-datasets"),
    "c943016242f98a4c1e70fb35842562e654425de5364c58ceb5e1186029c193f7":
        KnownFile("Houston2013", "2013_IEEE_GRSS_DF_Contest_Samples_TR.tif", None, (349, 1905), "uint8", 2_832,
                  "official contest file"),
    "9fd0093af69a8f91cc0f3ef7c67dd7f961445223c0a2497bdbed03e7f329a010":
        KnownFile("Houston2013", "2013_IEEE_GRSS_DF_Contest_Samples_VA.tif", None, (349, 1905), "uint8", 12_197,
                  "official contest file"),
    "6ff05737867f68ba381807564f431eafa8e603434971988767953122103ec09b":
        KnownFile("MUUFL", "LiDAR.mat", "LiDAR", (325, 220, 2), "float32", None, "elevation, intensity"),
    "32746e45d4f9aacfa8a34f2338a5ea4af4e2024a0219c543800a06733fc3b419":
        KnownFile("MUUFL", "gt.mat", "gt", (325, 220), "", 53_687, "full ground truth, no split"),
    "b912b3807b703cbd511ba0e64fd8e5e040a59abc7ff6d51193dda0868c516d45":
        KnownFile("Augsburg", "TrainImage.mat", "TrainImage", (332, 485), "uint8", 761),
    "87f9c9e0436007768ca7738c300b7c7812541e7043c69addd81c48c3bdc3c9fd":
        KnownFile("Augsburg", "TestImage.mat", "TestImage", (332, 485), "float32", 77_533, "stored as float32"),
}

_CHUNK = 8 << 20
_hashes: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file, streamed in 8 MiB chunks; computed once per file (path, size, mtime) per process."""
    path = Path(split_key(path)[0]).resolve()
    stat = path.stat()
    cache_key = (str(path), stat.st_size, stat.st_mtime_ns)
    if cache_key not in _hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        _hashes[cache_key] = digest.hexdigest()
    return _hashes[cache_key]


def identify(sha256: str) -> KnownFile | None:
    return KNOWN_FILES.get(sha256)


def split_card(dataset: str, inputs: dict[str, str], label_rasters: dict[str, np.ndarray],
               class_names: list[str]) -> dict:
    """What a run trains and tests on: each input file's SHA-256 and known-copy status, and per-class
    pixel counts of every split (``label_rasters``: split -> raster, 0 = unlabelled, 1..K)."""
    files = []
    for role, path in inputs.items():
        digest = sha256_file(path)
        known = identify(digest)
        files.append({"role": role, "path": str(path), "sha256": digest,
                      "copy": known.describe() if known else "unknown copy"})
    k = len(class_names)
    order = [s for s in ("train", "val", "test", "all") if s in label_rasters]
    counts = {split: np.bincount(label_rasters[split][label_rasters[split] > 0].ravel(),
                                 minlength=k + 1)[1:k + 1].tolist()
              for split in order}
    classes = [{"class": i + 1, "name": name, **{split: counts[split][i] for split in counts}}
               for i, name in enumerate(class_names)]
    return {"dataset": dataset, "files": files, "classes": classes,
            "total": {split: int(sum(c)) for split, c in counts.items()}}


def format_card(card: dict) -> str:
    """The card as log lines: one per file, a per-class table, the totals."""
    splits = list(card["total"])
    lines = [f"Split card ({card['dataset']}):"]
    for f in card["files"]:
        lines.append(f"  {f['role']:<6} {f['path']}  sha256 {f['sha256']}  {f['copy']}")
    width = max([len(c["name"]) for c in card["classes"]] + [5])
    lines.append("  " + " " * (4 + width) + "".join(f"{s:>9}" for s in splits))
    for c in card["classes"]:
        lines.append(f"  {c['class']:>2}  {c['name']:<{width}}" + "".join(f"{c[s]:>9,}" for s in splits))
    lines.append(f"      {'total':<{width}}" + "".join(f"{card['total'][s]:>9,}" for s in splits))
    return "\n".join(lines)
