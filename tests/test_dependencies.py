"""Every dependency range is closed at both ends, and CI's lower-bounds job pins each at its lower end."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import ROOT

tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+ (CI runs 3.11)")
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
REQUIREMENTS = [*PROJECT["dependencies"], *(r for extra in PROJECT["optional-dependencies"].values() for r in extra)]


def _lower_bounds(root: Path, *extras: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(root / ".ci" / "lower_bounds.py"), *extras], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("requirement", REQUIREMENTS)
def test_every_range_has_a_lower_and_an_upper_bound(requirement):
    operators = {spec.operator for spec in Requirement(requirement).specifier}
    assert ">=" in operators and operators & {"<", "<="}, f"{requirement}: declare both ends of the tested range"


def test_the_lower_bounds_job_pins_each_dependency_at_its_lower_bound():
    out = _lower_bounds(ROOT, "export", "datasets")
    assert out.returncode == 0, out.stderr
    pins = dict(line.split("==") for line in out.stdout.split())
    expected = {}
    for text in [*PROJECT["dependencies"], *PROJECT["optional-dependencies"]["export"],
                 *PROJECT["optional-dependencies"]["datasets"]]:
        requirement = Requirement(text)
        expected[requirement.name.lower()] = next(s.version for s in requirement.specifier if s.operator == ">=")
    assert pins == expected
    assert pins["torch"] == "2.13" and pins["wandb"] == "0.19.5"


def test_a_requirement_without_an_upper_bound_is_refused(tmp_path):
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "lower_bounds.py", tmp_path / ".ci")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n'
                                             'dependencies = ["numpy>=1.24,<3", "scipy>=1.10"]\n')
    out = _lower_bounds(tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip() == "'scipy>=1.10' declares no upper bound (a release that does not exist yet is untested)"
