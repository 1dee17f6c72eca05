"""The CLI's modules import as a tree: no cycle, not even through a lazy import.

A cycle among them (main → apps → main, as there was) works or fails depending
on which module is imported first, and a function-level import only hides it.
So the graph is read from the source (every ``import``, at any depth), checked
for cycles, and each module is also imported first in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import flynnp2p.cli

CLI_DIR = Path(flynnp2p.cli.__file__).parent
PACKAGE = "flynnp2p.cli"


def cli_modules() -> list[str]:
    return sorted(f"{PACKAGE}.{p.stem}" for p in CLI_DIR.glob("*.py") if p.stem != "__init__")


def imported_cli_modules(module: str) -> set[str]:
    """The ``flynnp2p.cli.*`` modules that ``module`` imports anywhere in its source."""
    path = CLI_DIR / f"{module.rsplit('.', 1)[1]}.py"
    found: set[str] = set()
    known = set(cli_modules())
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .common import x / from . import common
                base = ".".join([PACKAGE, *filter(None, [node.module])])
            names = [base, *(f"{base}.{a.name}" for a in node.names)]
        found |= {n for n in names if n in known and n != module}
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            cycle = visit(nxt, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def test_find_cycle_sees_a_cycle_and_a_tree() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_cli_import_graph_has_no_cycle() -> None:
    graph = {m: imported_cli_modules(m) for m in cli_modules()}
    assert f"{PACKAGE}.common" in graph  # the graph was read at all
    assert graph[f"{PACKAGE}.main"] >= {f"{PACKAGE}.apps", f"{PACKAGE}.jobs"}
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph) or [])


def test_common_imports_no_command_module() -> None:
    assert imported_cli_modules(f"{PACKAGE}.common") <= {f"{PACKAGE}.client"}


@pytest.mark.parametrize("module", cli_modules())
def test_each_cli_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
