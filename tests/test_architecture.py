"""The code's layers as docs/architecture.md draws them: every import (function-level ones included) goes down
the layer table, no module imports a private name of another, and the import graph has no cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from helpers import REPO

DOC = REPO / "docs" / "architecture.md"


def layer_table() -> dict[str, set[str]]:
    """``{package: packages it may import}`` from the table of docs/architecture.md (rows ``| `pkg/` | ... | may import |``)."""
    table = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = re.fullmatch(r"`(\w+)/`", cells[0]) if len(cells) >= 3 else None
        if name:
            table[name.group(1)] = set(re.findall(r"`(\w+)`", cells[-1]))
    return table


def project_modules(packages) -> dict[str, Path]:
    mods = {}
    for pkg in packages:
        for f in sorted((REPO / pkg).rglob("*.py")):
            parts = list(f.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def imports_of(module: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """``(module imported, name imported or None, line)`` for every import of a project module in ``path``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join(here + ([node.module] if node.module else []))
            targets = [(base, a.name) for a in node.names]
        else:
            continue
        for target, name in targets:
            full = f"{target}.{name}" if name and f"{target}.{name}" in mods else target
            while full and full not in mods:
                full = full.rpartition(".")[0]
            if full:
                found.append((full, None if f"{target}.{name}" in mods else name, node.lineno))
    return found


TABLE = layer_table()
PACKAGES = [p for p in TABLE if p != "tools"]
MODS = project_modules(PACKAGES)


def test_the_table_names_every_package_and_every_package_is_in_it():
    on_disk = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"}
    assert on_disk == set(PACKAGES), f"packages on disk {sorted(on_disk)} vs docs/architecture.md {sorted(PACKAGES)}"
    assert TABLE["backbones"] == set() and "tools" in TABLE


def test_every_module_is_listed_in_docs_architecture_once():
    text = DOC.read_text()
    for module, path in MODS.items():
        if path.name == "__init__.py":
            continue
        rel = path.relative_to(REPO).as_posix()
        name = path.name if path.parent.name in PACKAGES else f"{path.parent.name}/{path.name}"
        assert re.search(rf"`{re.escape(name)}`|`{re.escape(rel)}`", text), f"{rel} is not in docs/architecture.md"


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_go_down_the_layer_table(package):
    allowed = TABLE[package] | {package}
    wrong = []
    for module, path in MODS.items():
        if module.split(".")[0] != package:
            continue
        for target, _, line in imports_of(module, path, MODS):
            if target.split(".")[0] not in allowed:
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not wrong, f"{package}/ may import {sorted(TABLE[package])} only:\n" + "\n".join(wrong)


def test_no_private_name_crosses_modules():
    crossing = []
    for module, path in MODS.items():
        for target, name, line in imports_of(module, path, MODS):
            if name and name.startswith("_") and not name.startswith("__") and target != module:
                crossing.append(f"{path.relative_to(REPO)}:{line} imports {target}.{name}")
    assert not crossing, "\n".join(crossing)


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``edges`` (strongly connected components of more than one module, or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def test_find_cycles_finds_one():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_has_no_cycle_lazy_imports_counted():
    edges = {m: {t for t, _, _ in imports_of(m, p, MODS) if t != m} for m, p in MODS.items()}
    assert not find_cycles(edges)
