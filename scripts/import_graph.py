"""The project's import graph, read from the source (nothing is imported): for every module of the
given packages, the project modules it imports, and the line count.

    python scripts/import_graph.py [service training gsa_contract] [--cycles]
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, packages: set[str]) -> set[str]:
    """Project modules ``path`` imports at any depth of its code (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] in packages and (ROOT / Path(*name.split("."))).with_suffix(".py").exists() \
                    or (ROOT / Path(*name.split(".")) / "__init__.py").exists() and name.split(".")[0] in packages:
                found.add(name)
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("packages", nargs="*", default=["gsa_contract", "service", "training"])
    p.add_argument("--cycles", action="store_true", help="also report import cycles between modules")
    args = p.parse_args(argv)
    known = {"gsa_contract", "service", "training"}
    graph: dict[str, set[str]] = {}
    lines: dict[str, int] = {}
    for package in args.packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = module_name(path)
            graph[name] = project_imports(path, known) - {name}
            lines[name] = len(path.read_text(encoding="utf-8").splitlines())
    for name in sorted(graph):
        deps = sorted(graph[name])
        print(f"{name} ({lines[name]} lines) -> {', '.join(deps) if deps else '-'}")
    by_package = {pkg: sum(n for m, n in lines.items() if m.split(".")[0] == pkg) for pkg in args.packages}
    print("lines:", ", ".join(f"{pkg} {n}" for pkg, n in by_package.items()),
          f"| largest: {max(lines, key=lines.get)} ({max(lines.values())})")
    crossing = sorted({(m.split(".")[0], d.split(".")[0]) for m, ds in graph.items() for d in ds
                       if m.split(".")[0] != d.split(".")[0]})
    print("between packages:", ", ".join(f"{a} -> {b}" for a, b in crossing) or "none")
    if args.cycles:
        cycles = [(a, b) for a in graph for b in graph[a] if a in graph.get(b, set()) and a < b]
        print("two-module cycles:", ", ".join(f"{a} <-> {b}" for a, b in cycles) or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
