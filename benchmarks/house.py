"""The shape of the code base, as a table: the largest modules and classes, and what importing a pure
network (or any module) loads.

    python benchmarks/house.py                                   # the default figures
    python benchmarks/house.py --imports rsfusion.kernels rsfusion.lightning_modules.networks.das2f
"""
from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rsfusion"
HEAVY = ("lightning", "torchmetrics", "rasterio", "transformers", "wandb", "matplotlib", "scipy")

CLOSURE = """
import json, sys
before = set(sys.modules)
import {module}
loaded = sorted(set(sys.modules) - before)
ours = [m for m in loaded if m == "rsfusion" or m.startswith("rsfusion.")]
files = [sys.modules[m].__file__ for m in ours if getattr(sys.modules[m], "__file__", None)]
print(json.dumps({{"modules": len(loaded), "ours": ours, "lines": sum(len(open(f).readlines()) for f in files),
                  "heavy": sorted({{m.split(".")[0] for m in loaded}} & set({heavy}))}}))
"""


def largest(top: int = 5) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    modules, classes = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        name = str(path.relative_to(ROOT))
        modules.append((len(text.splitlines()), name))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                classes.append((node.end_lineno - node.lineno + 1, f"{name}:{node.name}"))
    return sorted(modules, reverse=True)[:top], sorted(classes, reverse=True)[:top]


def closure(module: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CLOSURE.format(module=module, heavy=list(HEAVY))], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--imports", nargs="+", default=["rsfusion.lightning_modules.networks.m3amba",
                                                          "rsfusion.kernels", "rsfusion.datamodules"])
    args = parser.parse_args()
    modules, classes = largest()
    print("| largest modules | lines |\n|---|---|")
    print("\n".join(f"| `{name}` | {n:,} |" for n, name in modules))
    print("\n| largest classes | lines |\n|---|---|")
    print("\n".join(f"| `{name}` | {n:,} |" for n, name in classes))
    print("\n| import | modules loaded | rsfusion modules | their lines | heavy packages loaded |")
    print("|---|---|---|---|---|")
    for module in args.imports:
        c = closure(module)
        print(f"| `{module}` | {c['modules']:,} | {len(c['ours'])} | {c['lines']:,} | {', '.join(c['heavy']) or '-'} |")


if __name__ == "__main__":
    main()
