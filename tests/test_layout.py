"""The package's layout: imports point one way (apps -> registry/methods -> distill -> core ->
data, models), and no module imports itself back through others (no import circles,
counting imports inside functions too)."""

from __future__ import annotations

import ast
from pathlib import Path

import mosaic_flwr

ROOT = Path(mosaic_flwr.__file__).resolve().parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            assert not (isinstance(node, ast.ImportFrom) and node.level), f"{name}: relative import"
            for target in targets:
                if target in modules:
                    edges.add(target)
                    break
        graph[name] = edges - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circles():
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _imports_of(prefix: str) -> set[str]:
    return {t for name, edges in _graph().items() if name == prefix or name.startswith(prefix + ".") for t in edges}


def test_layers_point_down():
    graph = _graph()
    assert graph, "no modules found"
    assert not {t for t in _imports_of("mosaic_flwr.core") if t.startswith(("mosaic_flwr.distill", "mosaic_flwr.methods",
                                                                             "mosaic_flwr.registry"))}
    assert not {t for t in _imports_of("mosaic_flwr.distill") if t.startswith("mosaic_flwr.methods")}
    # config knows no method: it reads their settings through the registry
    assert not {t for t in graph["mosaic_flwr.config"] if t.startswith(("mosaic_flwr.methods", "mosaic_flwr.distill"))}
    assert not {t for t in graph["mosaic_flwr.registry"] if t.startswith("mosaic_flwr.")}
    # the apps' library does not ship the test grid into its own imports
    assert not {t for name, edges in graph.items() if not name.startswith("mosaic_flwr.testing")
                for t in edges if t.startswith("mosaic_flwr.testing")}


def test_registry_names_every_method_module():
    from mosaic_flwr.registry import ENTRIES, methods

    files = {p.stem for p in (ROOT / "methods").glob("*.py") if p.stem != "__init__"} | {"mosaic"}
    named = {entry.split(":")[0].split(".")[0] for entry in ENTRIES.values()}
    assert files == named
    assert list(methods()) == list(ENTRIES)
