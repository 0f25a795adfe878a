"""The CLI's own commands, timed (issue 41): `nas --help`, `nas run --help`, `nas space show`
and `nas space validate` as a user types them, each the median of ``--runs`` fresh
processes, with the heavy packages each one imports (from ``python -X importtime``).

``--repo`` times another checkout (an older commit, say: ``git worktree add /tmp/old REV``)
with this machine's interpreter, so that before and after are measured in one sitting.

Run: python -m benchmarks cli-time [--runs 5] [--repo PATH] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = (
    ("--help",),
    ("run", "--help"),
    ("space", "show", "tiny_cpu"),
    ("space", "validate", "tiny_cpu"),
)
HEAVY = ("torch", "timm", "torchvision", "ray", "mlflow", "optuna", "open_clip")


def imported(args: tuple[str, ...], repo: Path = REPO) -> set[str]:
    """The top-level packages ``python -X importtime -m nas ARGS`` imports in ``repo``."""
    trace = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "nas", *args],
        cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, check=True,
        capture_output=True, text=True,
    ).stderr  # fmt: skip
    return {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in trace.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def time_command(repo: Path, args: tuple[str, ...], runs: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    walls = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "nas", *args], cwd=repo, env=env, check=True,
            capture_output=True,
        )  # fmt: skip
        walls.append(time.perf_counter() - start)
    return {
        "command": "nas " + " ".join(args),
        "median_s": round(statistics.median(walls), 3),
        "runs_s": [round(w, 3) for w in walls],
        "heavy_imports": sorted(imported(args, repo) & set(HEAVY)),
    }


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout to time")
    parser.add_argument("--json", type=Path, help="write the results here")


def run(args: argparse.Namespace) -> int:
    repo = args.repo.resolve()
    commit = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    rows = [time_command(repo, c, args.runs) for c in COMMANDS]
    out = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "commit": commit,
        "commands": rows,
    }
    for row in rows:
        heavy = ", ".join(row["heavy_imports"]) or "none"
        print(f"{row['command']:<48} {row['median_s']:6.2f} s   heavy imports: {heavy}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0
