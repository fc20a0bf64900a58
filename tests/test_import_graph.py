"""The import graph of ``rsfusion/``, read from the source with ``ast``: the layers stay apart and no
module imports itself back. Imports under ``if TYPE_CHECKING:`` (what editors see) and under
``if __name__ == "__main__":`` (a module run as a script) are not edges; every other import is,
wherever it stands, so a cycle cannot hide inside a function."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rsfusion"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _skipped(node: ast.If) -> bool:
    test = ast.unparse(node.test)
    return test in ("TYPE_CHECKING", "typing.TYPE_CHECKING") or "__main__" in test


def _imports(tree: ast.AST, module: str, is_package: bool):
    """(module, names) of every import in ``tree``: ``import a`` gives (a, []), ``from a import b, c``
    gives (a, [b, c])."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _skipped(node):
            yield from _imports(ast.Module(node.orelse, []), module, is_package)
            continue
        if isinstance(node, ast.Import):
            yield from ((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            yield base, [alias.name for alias in node.names]
        yield from _imports(node, module, is_package)


def import_graph() -> dict[str, set[str]]:
    """rsfusion module -> the rsfusion modules it imports (``from a import b`` imports ``a.b`` when that
    is a module, and ``a`` when some name is not a submodule of it)."""
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in files.items():
        edges = set()
        for base, names in _imports(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py"):
            submodules = {f"{base}.{name}" for name in names} & set(files)
            edges |= submodules
            if len(submodules) < len(names) or not names:
                edges.add(base)
        graph[module] = {name for name in edges if name in files} - {module}
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[1:2] == ["lightning_modules"] and len(parts) > 2:
        return {"networks": "networks", "outputs": "outputs", "commands": "commands"}.get(parts[2], "tasks")
    return parts[1] if len(parts) > 1 else "rsfusion"


GRAPH = import_graph()
FORBIDDEN = {"datamodules": {"tasks", "networks", "outputs", "commands"},
             "networks": {"tasks", "outputs", "commands", "datamodules"},
             "kernels": {"datamodules", "tasks", "networks", "outputs", "commands", "rsfusion"}}


def test_the_graph_sees_the_package():
    assert len(GRAPH) > 50
    assert "rsfusion.lightning_modules.networks.m3amba" in GRAPH["rsfusion.lightning_modules.m3amba"]
    assert "rsfusion.kernels.dispatch" in GRAPH["rsfusion.kernels"]
    assert "rsfusion.kernels.scan_triton" in GRAPH["rsfusion.kernels.dispatch"]  # inside a function: still an edge
    assert "rsfusion.kernels" not in GRAPH["rsfusion.kernels.dispatch"]  # from the package, a submodule only


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_only_what_is_below_it(layer):
    wrong = sorted(f"{module} -> {name}" for module, names in GRAPH.items() if _layer(module) == layer
                   for name in names if _layer(name) in FORBIDDEN[layer])
    assert not wrong, "\n".join(wrong)


def _cycle_from(start: str) -> list[str] | None:
    stack, seen = [(start, [start])], set()
    while stack:
        module, path = stack.pop()
        for name in GRAPH[module]:
            if name == start:
                return path + [start]
            if name not in seen:
                seen.add(name)
                stack.append((name, path + [name]))
    return None


def test_no_module_imports_itself_back():
    cycles = {" -> ".join(cycle) for module in GRAPH if (cycle := _cycle_from(module))}
    assert not cycles, "\n".join(sorted(cycles))


def test_the_checks_catch_a_cycle_and_a_layer_breach():
    GRAPH["rsfusion.kernels.dispatch"].add("rsfusion.kernels")
    GRAPH["rsfusion.kernels"].add("rsfusion.datamodules.errors")
    try:
        assert _cycle_from("rsfusion.kernels") is not None
        with pytest.raises(AssertionError, match="rsfusion.kernels -> rsfusion.datamodules.errors"):
            test_a_layer_imports_only_what_is_below_it("kernels")
    finally:
        GRAPH["rsfusion.kernels.dispatch"].discard("rsfusion.kernels")
        GRAPH["rsfusion.kernels"].discard("rsfusion.datamodules.errors")
