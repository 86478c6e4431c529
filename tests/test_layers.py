"""The package's layers: no module imports a module of a layer above it, and no import cycle.

Layers, bottom to top (a module may import its own layer's modules and those below):
errors/tokens → functional → ops → dispatch → rules → composites → pipeline → latent → heatmaps →
explain, audit → runs → testing, evaluation → integrations → vision_task (alias) → cli →
__main__ → the package root.
Every import counts: at module level, inside functions, and under ``TYPE_CHECKING``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lrp_explicit"
ROOT = "lrp_explicit"
LAYERS = [
    ("errors", "tokens"),
    ("functional",),
    ("ops",),
    ("dispatch",),  # module rules may run a forward under the dispatch (rules.ssm)
    ("rules",),
    ("composites",),
    ("pipeline",),
    ("latent",),
    ("heatmaps",),
    ("explain", "audit"),
    ("runs",),
    ("testing", "evaluation"),
    ("integrations",),
    ("vision_task",),
    ("cli",),
    ("__main__",),
]


def module_names() -> dict[str, Path]:
    """Dotted module name → file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """Package modules that module ``name`` imports (a name imported from a package counts as
    the submodule of that name when there is one, else as the package itself)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == ROOT or alias.name.startswith(ROOT + "."):
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not (source == ROOT or source.startswith(ROOT + ".")):
                continue
            for alias in node.names:
                child = f"{source}.{alias.name}"
                found.add(child if child in modules else source)
    return {m for m in found if m in modules and m != name}


def rank(name: str) -> tuple[int, str]:
    """Layer index and group (first component below the root) of a module."""
    parts = name.split(".")
    if len(parts) == 1:
        return len(LAYERS), ROOT
    for index, group in enumerate(LAYERS):
        if parts[1] in group:
            return index, parts[1]
    raise AssertionError(f"module {name} is in no layer: add it to LAYERS in {__file__}")


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    """Edges ``a → b`` where ``b`` lies in a higher layer than ``a``, or in another group of
    the same layer."""
    bad = []
    for a, targets in graph.items():
        ra, ga = rank(a)
        for b in sorted(targets):
            rb, gb = rank(b)
            if rb > ra or (rb == ra and gb != ga):
                bad.append(f"{a} → {b}")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles (each as the list of modules on it), found by depth-first search."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def package_graph() -> dict[str, set[str]]:
    modules = module_names()
    names = set(modules)
    return {name: imports_of(name, path, names) for name, path in modules.items()}


def test_every_module_has_a_layer():
    for name in module_names():
        rank(name)


def test_no_import_runs_up_the_layers():
    assert upward_edges(package_graph()) == []


def test_no_import_cycle():
    assert cycles(package_graph()) == []


def test_the_import_graph_is_read():
    """The checks see real edges (pipeline imports composites, dispatch imports ops …)."""
    graph = package_graph()
    assert "lrp_explicit.composites" in graph["lrp_explicit.pipeline.core"]
    assert "lrp_explicit.ops" in graph["lrp_explicit.dispatch"]
    assert "lrp_explicit.pipeline" in graph["lrp_explicit.explain.core"]
    assert "lrp_explicit.composites.registry" in graph["lrp_explicit.composites.generic"]


@pytest.mark.parametrize("edge,kind", [
    (("lrp_explicit.dispatch", "lrp_explicit.composites.base"), "up"),
    (("lrp_explicit.explain.core", "lrp_explicit.audit.report"), "up"),
    (("lrp_explicit.composites.generic", "lrp_explicit.composites"), "cycle"),
])
def test_the_checks_catch_what_they_look_for(edge, kind):
    """An upward edge, an edge across groups of one layer, and a cycle through a package's
    ``__init__`` are each reported when added to the real graph."""
    graph = package_graph()
    graph[edge[0]] = graph[edge[0]] | {edge[1]}
    if kind == "up":
        assert f"{edge[0]} → {edge[1]}" in upward_edges(graph)
    else:
        assert any(edge[0] in c and edge[1] in c for c in cycles(graph))


def test_relative_imports_resolve():
    modules = set(module_names())
    path = PACKAGE / "audit" / "run.py"
    found = imports_of("lrp_explicit.audit.run", path, modules)
    assert {"lrp_explicit.pipeline", "lrp_explicit.audit.ledger", "lrp_explicit.errors"} <= found
