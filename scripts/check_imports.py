"""Fail when a module of the package imports one that imports it back (directly or around a circle).

Every import counts, including those inside functions (a hidden cycle is still a cycle), and
``from a.pkg import sub`` counts as an import of ``a.pkg`` (its ``__init__``) too. Reads the source
with ``ast``, so nothing is imported:

    python scripts/check_imports.py            # prints the module graph's cycles, exit 1 if any
    python scripts/check_imports.py --graph    # also prints each module's evomerge imports
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = "evomerge"


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports (``from a import b`` is a.b when that is a module)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            # ``from pkg import sub`` reads ``sub`` from the package, whose ``__init__`` runs first:
            # it counts as an import of the package as well as of the submodule
            found.update([f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known] + [target])
    return {m for m in found if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--graph", action="store_true", help="print every module's imports")
    args = parser.parse_args()
    mods = modules(args.root)
    graph = {m: imports_of(m, p, set(mods)) for m, p in mods.items()}
    if args.graph:
        for m in sorted(graph):
            print(f"{m}: {', '.join(sorted(graph[m])) or '-'}")
    found = cycles(graph)
    for comp in found:
        print("import cycle: " + " <-> ".join(comp))
    print(f"{len(mods)} modules, {sum(map(len, graph.values()))} imports, {len(found)} cycle(s)")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
