"""The README and docs/: every relative link and anchor resolves, no page cites a file users do not have,
and every module is either tested in a file of its name or mapped to its tests in docs/ARCHITECTURE.md."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return found


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    return LINK.findall(text)


def test_the_pages_exist_and_link_to_each_other():
    assert len(PAGES) >= 12
    linked = {(ROOT / "README.md").parent.joinpath(target.split("#")[0]).resolve()
              for target in links(ROOT / "README.md") if not target.startswith("http")}
    assert {page.resolve() for page in PAGES if page.name != "README.md" or page.parent.name == "models"} <= linked


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_link_check_catches_a_broken_link_and_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[a](missing.md) [b](#title) [c](#nowhere)\n")
    assert links(page) == ["missing.md", "#title", "#nowhere"]
    assert anchors(page) == {"title"}


SOURCES = [*PAGES, *sorted((ROOT / "rsfusion").rglob("*.py")), *sorted((ROOT / "configs").rglob("*.yaml"))]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_cites_files_outside_the_repository(path):
    text = path.read_text()
    for pattern in (r"specs/\w+\.md", r"\.\./shared", r"/work/", r"\bspec §"):
        assert not re.search(pattern, text), f"{path.relative_to(ROOT)} cites {pattern!r}"


def _architecture_table() -> dict[str, list[str]]:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text().split("## Where each module is tested", 1)[1]
    rows = re.findall(r"^\| `(rsfusion/[\w/]+\.py)` \| (.+) \|$", text, flags=re.M)
    return {module: re.findall(r"`(tests/[\w/]+\.py)`", tests) for module, tests in rows}


def test_every_module_is_tested_in_a_file_of_its_name_or_mapped():
    table = _architecture_table()
    own = {path.stem for path in (ROOT / "tests").rglob("test_*.py")}
    missing = []
    for module in sorted((ROOT / "rsfusion").rglob("*.py")):
        if module.name in ("__init__.py", "__main__.py"):
            continue
        relative = str(module.relative_to(ROOT))
        if relative not in table and f"test_{module.stem}" not in own:
            missing.append(relative)
    assert not missing, f"modules without tests of their name and not in docs/ARCHITECTURE.md: {missing}"
    for module, tests in table.items():
        assert (ROOT / module).is_file(), f"docs/ARCHITECTURE.md maps {module}, which does not exist"
        assert tests and all((ROOT / t).is_file() for t in tests), f"{module}: {tests}"
