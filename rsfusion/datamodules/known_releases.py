"""Known public copies of the benchmark files, and the split card a benchmark DataModule logs.

The checksums and facts are of public copies checked by the project ("same as rs-fusion-datasets"
where that loader publishes the same checksum), and of the files rs-fusion-datasets 1.0 verifies when it
downloads (``download: true``). A file whose
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
    shape: tuple[int | str, ...]
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
    **{sha: KnownFile(dataset, name, key, shape, dtype, labelled, f"the {function} copy (its checksum)")
       for sha, (dataset, function, name, key, shape, dtype, labelled) in {
        # The files rs-fusion-datasets 1.0 verifies and rsfusion reads (download: true); shapes and dtypes as
        # its code reads them
        "1440f38594e8e82cc1944c084fc138ef55a70af54122828e999c4fb438574c14":
            ("Houston2013", "fetch_houston2013", "2013_IEEE_GRSS_DF_Contest_CASI.tif", None, (144, 349, 1905),
             "uint16", None),
        "16c69cf216535d7b4df2045b05d49c50a078609aa6d011a5e23e54f4cd08abda":
            ("Houston2013", "fetch_houston2013", "2013_IEEE_GRSS_DF_Contest_Samples_TR.txt", None, (349, 1905),
             "ENVI ROI export", None),
        "768bb02193d04c8020b45f1f31a49926a5b914040f77f71a81df756d6e8b8dcb":
            ("Houston2013", "fetch_houston2013", "2013_IEEE_GRSS_DF_Contest_Samples_VA.txt", None, (349, 1905),
             "ENVI ROI export", None),
        "6a0edba3c224df411623ed5774fc34e91929ab341709859b2f56cc38dbb3c6fd":
            ("Houston2013", "fetch_houston2013_mmr", "HSI.mat", "HSI", (349, 1905, 144), "", None),
        "7aa956e7c371fd29a495f0cb9bb8f572aaa4065fcfeda2b3e854a5cef74b35ad":
            ("Houston2013", "fetch_houston2013_mmr", "LiDAR.mat", "LiDAR", (349, 1905), "", None),
        "96ce863eaf4dc548c3140a480dee33c812d46194ae5ed345fed6e71a3d72b527":
            ("Houston2013", "fetch_houston2013_mmr", "TRLabel.mat", "TRLabel", (349, 1905), "", None),
        "46bd849d556c80ed67b33f23dd288eafa7ac9f97a847390be373b702b0bf5a45":
            ("Houston2013", "fetch_houston2013_mmr", "TSLabel.mat", "TSLabel", (349, 1905), "", None),
        "7b965fd405314b5c91451042e547a1923be6f5a38c6da83969032cff79729280":
            ("Trento", "fetch_trento", "Italy_hsi.mat", "data", (166, 600, 63), "", None),
        "a04dc90368d6a7b4f9d3936024ba9fef4105456c090daa14fff31b8b79e94ab1":
            ("Trento", "fetch_trento", "Italy_lidar.mat", "data", (166, 600, 2), "", None),
        "7e3fb2a2ea22c2661dfc768db3cb93c9643b324e7e64fadedfa57f5edbf1818f":
            ("Trento", "fetch_trento", "allgrd.mat", "mask_test", (166, 600), "", None),
        "69420a72866dff4a858ae503e6e2981af46f406a4ad8f4dd642efa43feb59edc":
            ("MUUFL", "fetch_muufl", "muufl_gulfport_campus_1_hsi_220_label.mat", "hsi", (325, 220), "struct", None),
        "2f13839d7840b32f55e0489d6934776dcfded7f678e23a9d8c2c092573946583":
            ("Augsburg", "fetch_augsburg_ouc", "augsburg_hsi.mat", "augsburg_hsi", (332, 485, 180), "uint16", None),
        "cd1dbfad2346f47e51d105b05e11aaefc872fe487a94bdc2913f4eaee3f8e82b":
            ("Augsburg", "fetch_augsburg_ouc", "augsburg_sar.mat", "augsburg_sar", (332, 485, 4), "float64", None),
        "065df71257f06c075ff3b37327c0fba75cc9146015a0f095a093fd12b9eaacbe":
            ("Augsburg", "fetch_augsburg_ouc", "augsburg_gt.mat", "augsburg_gt", (332, 485), "uint8", None),
        "8bc57037447cb42dbf3a8478d42d4bc217a53a6a0b349c2d67db8c660bef2f43":
            ("Augsburg", "fetch_augsburg_ouc", "augsburg_index.mat", "augsburg_train", (761, 2), "", 761),
        "580f397d9f249b4ec3f02b8cc570d910d765afa9f77b17d8a4f4799edee94b1f":
            ("Berlin", "fetch_berlin_ouc", "berlin_hsi.mat", "berlin_hsi", (1723, 476, 244), "float64", None),
        "a6cf2f86db7f1a02c340e813a7b46f9c6c58e297e1eb9b5fa19ed49244b2b8a7":
            ("Berlin", "fetch_berlin_ouc", "berlin_sar.mat", "berlin_sar", (1723, 476, 4), "float64", None),
        "dd9286cd565535857721627878de3cbebffa2dacc625b539474d16cba3a7343e":
            ("Berlin", "fetch_berlin_ouc", "berlin_gt.mat", "berlin_gt", (1723, 476), "uint8", None),
        "1a66ec454ea95bbf5782525d9fcf9a04412a948b7b3aa6919ed324516d42a8b5":
            ("Berlin", "fetch_berlin_ouc", "berlin_index.mat", "berlin_train", ("N", 2), "", None),
    }.items()},
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
