"""The project's internal import graph, read from the source (no import is executed):
every ``import``/``from ... import`` of ``nas`` or ``trainers``, module-level, inside
functions and under ``if TYPE_CHECKING:`` alike (a type-only import still ties two modules).
Prints the import cycles (strongly connected components of more than one module) and the
function-level internal imports; exits 1 if there is a cycle.

    python scripts/import_graph.py            # cycles, then function-level imports
    python scripts/import_graph.py --cycles   # cycles only
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nas", "trainers")


def modules() -> dict[str, Path]:
    """Every module of the packages, by dotted name (a package by its ``__init__``)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The project module ``name`` refers to (a name inside a module resolves to the module)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported module, line, at function level) for each internal import of one module."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")
                    up = up[: len(up) - child.level + 1]
                    base = ".".join([*up, base] if base else up)
                # `from pkg import mod` imports the module pkg.mod where there is one
                targets = [f"{base}.{a.name}" for a in child.names] or [base]
            else:
                visit(child, inner)
                continue
            for target in targets:
                resolved = _resolve(target, known)
                if resolved and resolved != name:
                    out.append((resolved, child.lineno, inner))

    visit(tree, False)
    return out


def graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """The import graph and the function-level imports (importer, imported, line)."""
    known = modules()
    edges: dict[str, set[str]] = defaultdict(set)
    nested = []
    for name, path in known.items():
        edges[name]
        for target, line, inner in imports(name, path, known):
            edges[name].add(target)
            if inner:
                nested.append((name, target, line))
    return edges, nested


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", action="store_true", help="print the cycles only")
    args = parser.parse_args(argv)
    edges, nested = graph()
    found = cycles(edges)
    for component in found:
        print(f"cycle of {len(component)} modules: {', '.join(component)}")
    if not args.cycles:
        print(f"{len(nested)} function-level internal imports:")
        for importer, imported, line in sorted(nested):
            print(f"  {importer}:{line} -> {imported}")
    print(f"{len(edges)} modules, {len(found)} import cycle(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
