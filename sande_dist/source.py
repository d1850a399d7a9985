"""The package's own source, read as text: its import graph, its layers, and hashes of its code.

Every ``import`` in a module counts, at the top or inside a function (a lazy import
is still a dependency). The layer order is the one of ARCHITECTURE.md: a module may
import its own layer or the ones below it, never one above, and no two modules may
import each other, directly or around a loop. ``code_hash`` hashes the source a
module needs (itself and everything it imports from the package), so a stage's
skip key changes when code that makes its result changes, and only then.
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional, Sequence

# Lowest first. A name stands for that module and every module below it; the top package's own
# name stands for its __init__ only.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("sande_dist", "sande_dist.errors"),
    ("sande_dist.registry", "sande_dist.resources", "sande_dist.source", "sande_dist.assets", "sande_dist.timing",
     "sande_dist.tracking", "sande_dist.machine"),
    ("sande_dist.config",),
    ("sande_dist.rundir",),
    ("sande_dist.models", "sande_dist.data", "sande_dist.distributed"),
    ("sande_dist.training", "sande_dist.generation", "sande_dist.evaluation"),
    ("sande_dist.pipeline",),
    ("sande_dist.cli",),
)


def modules(root: Path, package: str) -> dict[str, Path]:
    """Module name -> file for every ``.py`` under the package folder ``root``."""
    out = {}
    for path in sorted(Path(root).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def _imported(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Package modules that ``module`` imports: ``from a import b`` counts ``a.b`` when that is a
    module, else ``a``; any name counts as the longest known module it starts with."""
    base = module if is_package else module.rpartition(".")[0]

    def longest(name: str) -> str:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name

    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(longest(a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.add(full if full in known else longest(target))
    found.discard("")
    found.discard(module)
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    files = modules(root, package)
    known = set(files)
    return {name: _imported(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", known)
            for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import loops, each as the modules around it (first module repeated at the end)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def layer_of(module: str, layers: Sequence[Sequence[str]]) -> Optional[int]:
    """The index of the most specific layer entry that ``module`` falls under."""
    best, depth = None, -1
    for i, names in enumerate(layers):
        for name in names:
            below = "." in name and module.startswith(name + ".")
            if (module == name or below) and name.count(".") > depth:
                best, depth = i, name.count(".")
    return best


def layer_violations(graph: dict[str, set[str]], layers: Sequence[Sequence[str]]) -> list[str]:
    """Imports that run up the layer order, and modules no layer names."""
    problems = []
    for module, targets in sorted(graph.items()):
        mine = layer_of(module, layers)
        if mine is None:
            problems.append(f"{module}: in no layer; add it to LAYERS")
            continue
        for target in sorted(targets):
            theirs = layer_of(target, layers)
            if theirs is not None and theirs > mine:
                problems.append(f"{module} (layer {mine}) imports {target} (layer {theirs}): up the layer order")
    return problems


def package_root() -> Path:
    return Path(__file__).resolve().parent


@lru_cache(maxsize=1)
def _graph() -> dict[str, set[str]]:
    return import_graph(package_root(), "sande_dist")


def closure(names: Iterable[str], graph: Optional[dict[str, set[str]]] = None) -> set[str]:
    """``names`` and every package module they import, transitively."""
    graph = graph if graph is not None else _graph()
    seen, todo = set(), [n for n in names if n in graph]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph.get(name, ()))
    return seen


@lru_cache(maxsize=None)
def code_hash(names: tuple[str, ...]) -> str:
    """Hash of the source of ``names`` and of everything they import from the package."""
    files = modules(package_root(), "sande_dist")
    h = hashlib.sha256()
    for name in sorted(closure(names)):
        h.update(name.encode() + b"\0" + files[name].read_bytes() + b"\0")
    return h.hexdigest()[:16]
