"""Functions over 80 lines and files over 400 in nas/, trainers/ and benchmarks/ (issue 39's
limits), read from the source. Exits 1 if there is one.

    python scripts/sizes.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("nas", "trainers", "benchmarks")
MAX_FUNCTION, MAX_FILE = 80, 400


def too_long() -> list[str]:
    found = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT)
            lines = path.read_text().count("\n")
            if lines > MAX_FILE:
                found.append(f"{rel}: {lines} lines (file limit {MAX_FILE})")
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION:
                        found.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    return found


if __name__ == "__main__":
    found = too_long()
    print("\n".join(found) or "every function <= 80 lines, every file <= 400")
    sys.exit(1 if found else 0)
