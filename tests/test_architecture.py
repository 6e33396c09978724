"""The package's layers, read from the source with ``ast`` (nothing is imported):

    cli, bench*, compare              entry points
    api                               fedslip.run / resume / kstep (starts a launcher for flower-sim)
    launch/  (simulation, deployment) start the processes that carry a run
    flower_app                        Flower's ServerApp / ClientApp
    rounds                            the round loop
    engines/ (embedded, flower)       carry messages between the server and the clients
    client, server, experiment, ...   the method
    views, config, storage, ...       small shared types and helpers

An import edge goes down, never up, so there is no import cycle; and the engines only carry messages:
they never reach a launcher, the Flower app or the round loop.

Every import counts: module level, inside functions (a lazy import is still a dependency, and the
cycles this test guards against ran through lazy imports) and under ``TYPE_CHECKING``. Importing
``a.b.c`` also runs ``a.b``'s ``__init__``, so that is an edge too. The root ``fedslip/__init__.py``
is not a node: Python runs it before any fedslip module, so every module depends on it whether it
names it or not (it holds the version, the config names and a lazy facade over ``api``).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fedslip"
ROOT = PACKAGE.name

# Upward edges that still exist, each with what removes it. The test fails when one is gone, so that
# its entry is deleted with it.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}
ABOVE_ENGINES = ("fedslip.api", "fedslip.flower_app", "fedslip.launch", "fedslip.rounds")  # and submodules


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> set[str]:
    """Every dotted name an import in ``path`` may load: ``from .x import y`` gives ``fedslip.x`` and
    ``fedslip.x.y`` (``y`` may be a submodule); relative imports resolved against the module's package."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """fedslip module -> the fedslip modules (and their parent packages) its imports load."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths) - {ROOT}
    graph = {}
    for name, path in paths.items():
        if name == ROOT:
            continue
        edges = set()
        for target in imported_names(path):
            parts = target.split(".")
            # the module itself and each package above it (their __init__ runs first)
            edges.update(m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in modules)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str | None]:
    """Every module ``start``'s imports load, directly or not, with the module that imports it."""
    seen: dict[str, str | None] = {start: None}
    todo = [start]
    while todo:
        node = todo.pop()
        for nxt in graph.get(node, ()):
            if nxt not in seen:
                seen[nxt] = node
                todo.append(nxt)
    return seen


def chain(seen: dict[str, str | None], end: str) -> str:
    links = [end]
    while seen[links[-1]] is not None:
        links.append(seen[links[-1]])
    return " -> ".join(reversed(links))


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "fedslip.client" in graph["fedslip.rounds"]  # from .client import evaluate (module level)
    assert "fedslip.launch.simulation" in graph["fedslip.api"]  # inside run()
    assert "fedslip.experiment" in graph["fedslip.engines.embedded"]  # inside _worker_init
    assert "fedslip.config" in graph["fedslip.engines.embedded"]  # from ..config import (two dots)


def test_fedslip_modules_import_each_other_without_a_cycle():
    graph = import_graph()
    for (importer, imported), why in KNOWN_UPWARD.items():
        assert imported in graph.get(importer, ()), (
            f"{importer} no longer imports {imported}: delete its KNOWN_UPWARD entry ({why})")
        graph[importer] = graph[importer] - {imported}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_engines_only_carry_messages():
    """No engine module reaches (directly or through another module) a launcher, the Flower app or the
    round loop: the engines sit below all three."""
    graph = import_graph()
    engines = [m for m in graph if m == "fedslip.engines" or m.startswith("fedslip.engines.")]
    assert {"fedslip.engines", "fedslip.engines.embedded", "fedslip.engines.flower"} <= set(engines)
    for engine in engines:
        seen = reachable(graph, engine)
        above = [m for m in seen if any(m == a or m.startswith(a + ".") for a in ABOVE_ENGINES)]
        assert not above, "; ".join(chain(seen, m) for m in sorted(above))
