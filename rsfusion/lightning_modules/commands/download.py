"""``rsfusion download NAME``: fetch one benchmark with rs-fusion-datasets (checksums verified), and print
where it is, each file's SHA-256, and how to use it."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rsfusion.datamodules.downloads import SOURCES, fetch
from rsfusion.datamodules.errors import InputError
from rsfusion.datamodules.known_releases import identify, sha256_file
from rsfusion.lightning_modules.commands.cli import show_rsfusion_log


def main(argv: list[str] | None = None) -> None:
    names = {name.lower(): name for name in SOURCES}
    parser = argparse.ArgumentParser(prog="rsfusion download", description=__doc__.split("\n")[0])
    parser.add_argument("name", help=f"one of {', '.join(SOURCES)} (any case)")
    parser.add_argument("--root", type=Path, help="the data home to download into (default: rs-fusion-datasets', "
                                                   "SCIKIT_LEARN_DATA or ~/scikit_learn_data)")
    args = parser.parse_args(argv)
    if args.name.lower() not in names:
        parser.error(f"unknown dataset {args.name!r}: rs-fusion-datasets fetches {', '.join(SOURCES)} (the others: "
                     "rsfusion datasets)")
    show_rsfusion_log()
    name = names[args.name.lower()]
    try:
        folder, record = fetch(name, args.root)
    except InputError as err:
        sys.exit(f"error: {err}")
    print(f"{name}: {folder}")
    for file in SOURCES[name].files:
        sha = sha256_file(folder / file)
        known = identify(sha)
        print(f"  {file}  sha256 {sha}  {'known: ' + known.note if known else 'not a copy rsfusion knows'}")
    if record.get("mirrors_used"):
        print(f"  downloaded from {', '.join(record['mirrors_used'])}")
    home = f" --data.init_args.root {args.root}" if args.root else ""
    print(f"Use it: --data.init_args.download true{home} (or --data.init_args.root {folder})")
