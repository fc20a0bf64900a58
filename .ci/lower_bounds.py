"""Print pip constraints pinning every dependency of pyproject.toml (and the given extras) to its
declared lower bound: ``name>=X`` becomes ``name==X``. The minimum-versions CI job installs with them,
so the bounds in pyproject.toml are, by construction, the versions that job tested.

    python .ci/lower_bounds.py export > constraints.txt
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"])
for extra in sys.argv[1:]:
    requirements += project["optional-dependencies"][extra]
pins = {}
for requirement in requirements:
    name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
    lower = re.search(r">=\s*([0-9][^,;\s]*)", requirement)
    if lower is None:
        sys.exit(f"{requirement!r} declares no lower bound")
    if not re.search(r"<\s*[0-9]", requirement):
        sys.exit(f"{requirement!r} declares no upper bound (a release that does not exist yet is untested)")
    pins[name] = lower.group(1)
print("\n".join(f"{name}=={version}" for name, version in sorted(pins.items())))
