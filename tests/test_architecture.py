"""The layer contract of ARCHITECTURE.md, enforced: each layer imports only from the layers below it (or its own),
and no import cycle exists between modules or between the package's top-level folders. Imports inside functions
count too (a lazy import is still a dependency). The checks also run on a made-up module graph, so they can fail."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "secquant"

# Bottom to top. A module belongs to the longest prefix listed; the root package and `__main__` (which
# re-export the faces) are outside the layering.
LAYERS: list[tuple[str, ...]] = [
    ("secquant.errors", "secquant._lazy", "secquant._version", "secquant.data"),
    ("secquant.quant.primitives",),
    ("secquant.quant", "secquant.quant.schema", "secquant.quant.observers", "secquant.quant.nonuniform"),
    ("secquant.quant.modules",),
    ("secquant.quant.algorithms",),
    ("secquant.recipes",),
    ("secquant.artifact",),
    ("secquant.models",),
    ("secquant.security",),
    ("secquant.privacy",),
    ("secquant.audits",),
    ("secquant.runtime",),
    ("secquant.api", "secquant.fidelity", "secquant.tuning", "secquant.demo", "secquant.report", "secquant.cli",
     "secquant.server"),
]
UNLAYERED = {"secquant", "secquant.__main__"}


def modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the secquant modules it imports (at any depth of its code)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
                for alias in node.names:  # `from pkg import mod` imports pkg.mod; `from mod import x` imports mod
                    dep = f"{target}.{alias.name}" if f"{target}.{alias.name}" in mods else target
                    if dep in mods and dep != name:
                        edges[name].add(dep)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in mods and alias.name != name:
                        edges[name].add(alias.name)
    return edges


def layer_of(module: str) -> int | None:
    if module in UNLAYERED:
        return None
    best, level = -1, None
    for i, prefixes in enumerate(LAYERS):
        for pre in prefixes:
            if (module == pre or module.startswith(pre + ".")) and len(pre) > best:
                best, level = len(pre), i
    return level


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for a, deps in edges.items():
        la = layer_of(a)
        for b in deps:
            lb = layer_of(b)
            if la is not None and lb is not None and lb > la:
                bad.append(f"{a} (layer {la}) imports {b} (layer {lb})")
    return sorted(bad)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on, stack, out, counter = set(), [], [], [0]
    nodes = set(edges) | {d for ds in edges.values() for d in ds}
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def folder_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    def top(m: str) -> str:
        return ".".join(m.split(".")[:2])

    out: dict[str, set[str]] = defaultdict(set)
    for a, deps in edges.items():
        for b in deps:
            if top(a) != top(b) and a not in UNLAYERED:
                out[top(a)].add(top(b))
    return out


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    return mods, import_graph(mods)


def test_every_module_has_a_layer(graph):
    mods, _ = graph
    assert [m for m in mods if m not in UNLAYERED and layer_of(m) is None] == []


def test_layers_import_only_downward(graph):
    _, edges = graph
    assert upward_imports(edges) == []


def test_no_import_cycles_between_modules_or_folders(graph):
    _, edges = graph
    assert cycles(edges) == []
    assert cycles(folder_graph(edges)) == []


def test_the_checks_catch_what_they_forbid():
    edges = {"secquant.quant.modules.weight": {"secquant.api"}, "secquant.api": {"secquant.cli"},
             "secquant.cli": {"secquant.api"}, "secquant.models.a": {"secquant.artifact.b"},
             "secquant.artifact.b": {"secquant.models.a"}}
    assert upward_imports(edges)[0].startswith("secquant.artifact.b (layer 6) imports secquant.models.a")
    assert any("secquant.quant.modules.weight" in b for b in upward_imports(edges))
    assert ["secquant.api", "secquant.cli"] in cycles(edges)
    assert ["secquant.artifact", "secquant.models"] in cycles(folder_graph(edges))


def test_modules_and_functions_stay_small(graph):
    """Issue 18's measure: no source file over 600 lines, no function over 120."""
    mods, _ = graph
    long_files, long_functions = [], []
    for name, path in mods.items():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > 600:
            long_files.append(name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 120:
                long_functions.append(f"{name}.{node.name}")
    assert long_files == [] and long_functions == []
