"""The package layout: no import loops and no import pointing upward, function-level imports included.

Layers, bottom to top: ``model`` (the codec), ``service`` (the REST service on it), ``lalic`` (the
command line over both). A function-level import hides a loop from the interpreter until the
function runs, so the graph is read from the source (every ``import`` statement, wherever it
stands) rather than from what importing a module happens to execute.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("model", "service", "lalic")
"""Packages from the bottom up: each may import only the ones before it."""


def module_names() -> list[str]:
    """Every module of the three packages, as dotted names."""
    names = []
    for package in LAYERS:
        for path in sorted((REPO / package).glob("*.py")):
            names.append(package if path.stem == "__init__" else f"{package}.{path.stem}")
    return names


def imports_of(module: str) -> set[str]:
    """The project modules that ``module`` imports anywhere in its source (not only at the top)."""
    package, _, name = module.partition(".")
    path = REPO / package / f"{name or '__init__'}.py"
    known = set(module_names())
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in known and target != module)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_reports_a_loop() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_loop() -> None:
    graph = {module: imports_of(module) for module in module_names()}
    assert len(graph) > 40
    assert find_cycle(graph) is None


@pytest.mark.parametrize("module", module_names())
def test_no_import_points_upward(module: str) -> None:
    level = LAYERS.index(module.partition(".")[0])
    upward = sorted(m for m in imports_of(module) if LAYERS.index(m.partition(".")[0]) > level)
    assert upward == [], f"{module} imports {upward} from a layer above it"


def test_every_module_imports_alone() -> None:
    """Each module imports first in a fresh interpreter (one interpreter per package, each module
    imported after a reset of the project's modules), so no module relies on another's side effects."""
    code = (
        "import sys\n"
        f"names = {module_names()!r}\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] in ('model', 'service', 'lalic')]:\n"
        "        del sys.modules[loaded]\n"
        "    __import__(name)\n"
        "print(len(names))\n"
    )
    command = [sys.executable, "-c", code]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout) == len(module_names())
