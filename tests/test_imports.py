"""The package's import structure: no cycles (even for types) and light commands stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import evalsyncd

PACKAGE = Path(evalsyncd.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere (``TYPE_CHECKING`` and function
    bodies included): ``from a.b import c`` names ``a.b.c`` when that is a module."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:
                        edges.add(sub)
                    elif base in modules:
                        edges.add(base)
        edges.discard(name)
        graph[name] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (its modules in order), or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()
"""Import edges a cycle is allowed through (``(importer, imported)``): none left."""


def test_the_import_graph_has_no_cycle() -> None:
    """No module imports (even only for type checking, even inside a function) a module
    that imports it back, directly or through others; a parent package importing its
    own submodules eagerly is the one allowed edge back."""
    graph = _graph()
    for importer, imported in KNOWN_CYCLE_EDGES:
        graph[importer].discard(imported)
    for name in graph:
        # a submodule runs its package's __init__ first: that edge is implicit, and an
        # eager __init__ importing the submodule is not a cycle of the code's own making
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    assert "evalsyncd.sync.scheduler" in graph
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_the_cycle_check_finds_a_cycle() -> None:
    """The check itself can fail: a two-module loop is reported."""
    assert _cycle({"a": {"b"}, "b": {"a"}, "c": set()}) == ["a", "b", "a"]


@pytest.mark.parametrize("module", ["evalsyncd.status", "evalsyncd.verify", "evalsyncd.cli"])
def test_status_and_verify_do_not_load_the_daemon(module: str) -> None:
    """Importing what ``evalsyncd status`` and ``verify`` run loads neither watchdog nor the
    daemon's core (scheduler, shippers, service); ``evalsyncd.sync`` resolves them lazily."""
    heavy = ("watchdog", "aiolimiter", "evalsyncd.sync.service", "evalsyncd.sync.scheduler",
             "evalsyncd.sync.tailmode", "evalsyncd.sync.perfile", "evalsyncd.sync.watcher")  # fmt: skip
    assert _loaded_by(module, heavy) == []
    lazy = subprocess.run(
        [sys.executable, "-c", "import sys, evalsyncd.sync as s; s.Service; "
         "print('evalsyncd.sync.service' in sys.modules)"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert lazy.strip() == "True"  # the lazy name still resolves


def test_the_daemon_does_not_load_the_store() -> None:
    """The daemon's engine (what ``evalsyncd run`` imports) loads no module of
    ``evalsyncd.store``: it writes the run catalog through :mod:`evalsyncd.catalog`, and
    retention reads a run's metadata with the store's rules only when it looks at runs."""
    assert _loaded_by("evalsyncd.sync.service, evalsyncd.storage.s3", ("evalsyncd.store",)) == []


def _loaded_by(modules: str, prefixes: tuple[str, ...]) -> list[str]:
    """The modules named ``prefixes`` or below them that importing ``modules`` (a
    comma-separated list) loads, in a fresh interpreter."""
    code = (
        f"import sys, {modules}\n"
        f"prefixes = {prefixes!r}\n"
        "print(sorted(m for m in sys.modules if any(m == p or m.startswith(p + '.') "
        "for p in prefixes)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded: list[str] = ast.literal_eval(out.strip())
    return loaded
