"""The quickstart end to end (issue 10, item 5): the README's main job, timed from an empty
output folder, with how the wall time splits between set-up (spec checks, data preparation,
starting Ray) and the stages (from the run's own ``timings.json``).

Run: python -m benchmarks quickstart-time [--runs 2] [--json OUT.json]
     [--spec experiments/dg_quickstart.yaml]   (another quickstart: the same measurement)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_run(output: Path, spec: str = "experiments/quickstart.yaml") -> dict:
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nas",
            "run",
            spec,
            "--output",
            str(output),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    stages = json.loads((output / "timings.json").read_text())[-1]["stages"]
    results = json.loads((output / "results.json").read_text())
    return {
        "wall_s": wall,
        "stages_s": stages,
        "setup_and_teardown_s": wall - sum(stages.values()),
        "test_acc": results["per_dataset"],
        **({"targets": results["targets"]} if "targets" in results else {}),
    }


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--spec", default="experiments/quickstart.yaml", help="the spec to time")


def run(args: argparse.Namespace) -> int:
    runs = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(one_run(Path(tmp) / "quickstart", args.spec))
        print(json.dumps(runs[-1]), flush=True)
    results = {
        "spec": args.spec,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "runs": runs,
        "median_wall_s": statistics.median(r["wall_s"] for r in runs),
    }
    print(f"median wall time: {results['median_wall_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0
