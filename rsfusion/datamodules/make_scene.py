"""``rsfusion make-scene``: write a built-in synthetic scene's GeoTIFFs (``rsfusion make-scene --seed 1``).

The scenes :class:`~rsfusion.datamodules.synthetic.SyntheticDataModule` trains on, as files: another seed
gives another scene of the same kind (other class regions, spectra drawn anew), e.g. to map with a
checkpoint trained on seed 0 (docs/maps.md). Prints the files written.
"""
from __future__ import annotations

import argparse

from rsfusion.datamodules.synthetic import ensure_scene


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="rsfusion make-scene", description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="hsi_dsm", choices=["hsi_dsm", "hsi_sar", "ms_pan"])
    parser.add_argument("--seed", type=int, default=0, help="the scene generator's seed (default 0)")
    parser.add_argument("--root", default="data/synthetic", help="files go to <root>/<kind>-seed<seed>/")
    parser.add_argument("--height", type=int, help="rows of the reference grid (default: the kind's)")
    parser.add_argument("--width", type=int, help="columns of the reference grid (default: the kind's)")
    args = parser.parse_args(argv)
    size = {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
    paths = ensure_scene(args.root, args.kind, args.seed, **size)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return paths



if __name__ == "__main__":
    main()
