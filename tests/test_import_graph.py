"""The package's internal import graph has no cycles (counting imports inside functions too).

A lazy import only hides a cycle from the interpreter; the two modules still cannot be understood,
tested or reused apart. Edges go to the module an import statement names (``from a.b import c``
names ``a.b.c`` when that is a module, else ``a.b``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import slimlm

ROOT = Path(slimlm.__file__).parent


def module_names() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, from the source, no import executed."""
    mods = module_names()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:  # `import a.b.c` of a name inside a module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_graph_sees_known_edges() -> None:
    graph = import_graph()
    assert "slimlm.models.arch" in graph["slimlm.methods.linear"]
    assert "slimlm.distill.trainer" in graph["slimlm.methods.distill_step"]


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" ↔ ".join(c) for c in found)


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same graph between first-level parts (``slimlm.methods``, ``slimlm.distill``, ``slimlm.cli`` …)."""
    def part(m: str) -> str:
        return ".".join(m.split(".")[:2])

    out: dict[str, set[str]] = {}
    for a, bs in graph.items():
        if a == "slimlm":  # the package root re-exports the public API; nothing inside imports it
            continue
        out.setdefault(part(a), set()).update(part(b) for b in bs if part(b) not in (part(a), "slimlm"))
    for targets in out.values():
        targets.intersection_update(out)
    return out


def test_no_cycles_between_subpackages() -> None:
    graph = import_graph()
    found = cycles(package_graph(graph))
    assert not found, "subpackage cycles: " + "; ".join(" ↔ ".join(c) for c in found)


if __name__ == "__main__":
    for c in cycles(import_graph()) + cycles(package_graph(import_graph())):
        print(" ↔ ".join(c))
