"""``rsfusion datasets``: every benchmark, its modalities, size, classes, licence, citations, source,
whether rs-fusion-datasets has it cached, and the configs that use it. Works without the package."""
from __future__ import annotations

import argparse
from pathlib import Path

from rsfusion.datamodules.catalogue import DATASETS, configs_using, source_of
from rsfusion.datamodules.downloads import INSTALL, data_home, files_folder, is_cached, package_version


def _configs() -> Path:
    here = Path("configs")
    return here if here.is_dir() else Path(__file__).resolve().parents[3] / "configs"


def table(configs: Path, home: Path | None = None) -> str:
    lines = ["| dataset | modalities (bands) | size | classes | licence | cite | source | cached | configs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for d in DATASETS:
        source = source_of(d)
        cached = ("yes" if is_cached(source, home) else "no") if source else "-"
        cite = "; ".join(c.split(",")[0] + " " + c.rstrip(".").split(" ")[-1] for c in d.citations) or "-"
        lines.append(f"| {d.name} | {d.modalities} | {d.size} | {d.classes or '-'} | {d.licence} | {cite} | "
                     f"{d.source} | {cached} | {', '.join(configs_using(d, configs)) or '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rsfusion datasets", description=__doc__.split("\n")[0])
    parser.add_argument("--configs", type=Path, default=_configs(), help="the configs folder (default: ./configs, "
                                                                         "else the repository's)")
    parser.add_argument("--home", type=Path, help="rs-fusion-datasets' data home (default: SCIKIT_LEARN_DATA or "
                                                   "~/scikit_learn_data)")
    args = parser.parse_args(argv)
    print(table(args.configs, args.home))
    version = package_version()
    print(f"\nCache: {data_home(args.home)} (rs-fusion-datasets' data home); "
          + (f"rs-fusion-datasets {version} installed: `download: true` or `rsfusion download NAME` fetches a "
             "dataset." if version else f"rs-fusion-datasets is not installed: {INSTALL} to download "
                                          "(`download: true`, `rsfusion download NAME`)."))
    for d in DATASETS:
        if source_of(d) and is_cached(source_of(d), args.home):
            print(f"{d.name}: {files_folder(source_of(d), args.home)}")
    print("Licences and full citations: docs/datasets.md")
