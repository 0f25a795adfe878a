"""Can the search reach every point of its space? (issue 37, item 1)

Synthetic fitness functions, each peaked at one in-budget subnet (minus the distance to it:
per-layer dims for the layered kinds, mismatched fields for PGN), searched with the mini-VTAB
benchmarks' settings (100 candidates) over 50 seeds, by evolution and Optuna TPE with anchors
and budget moves, and by NOAH's own evolution (no anchors, no moves) as the before. Reported:
the share of seeds whose best is the peak. No training: a few minutes on a CPU.

Run: python -m benchmarks reachability --json benchmarks/results/reachability_cpu_DATE.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

from nas.search import Evaluated, make_search
from nas.space.search_space import Bounds, Budget, SearchSpace, load_space
from nas.space.subnet import Subnet

EVOLUTION = {"generations": 5, "population": 20, "top_k": 5, "mutations": 8, "crossovers": 8}
ALGORITHMS = {
    "evolution": ("evolution", EVOLUTION),
    "noah-evolution": ("evolution", {**EVOLUTION, "anchors": False, "moves": 0.0}),
    "optuna-tpe": ("optuna-tpe", {"num_candidates": 100, "batch_size": 20}),
}
PGN = {"generator": "resnet10", "placement": "border"}
UNIFORM = {"vpt": {"depth": 6, "dims": 8}, "lora": {"depth": 6, "dims": 2}}
PGN_LORA = {"lora": [2, 2], "pgn": {"prompts": 8, "library": 32, "resolution": 28, **PGN}}
CASES = {  # name: (space, budget, peak)
    "pgn alone": (
        "noah_pgn_border_cpu",
        400_000,
        {"pgn": {"prompts": 8, "library": 64, "resolution": 28, **PGN}},
    ),
    "lora alone": ("tiny_cpu", 20_000, {"lora": {"depth": 6, "dims": 4}}),
    "mixed, uniform per module": ("tiny_cpu", 20_000, UNIFORM),
    "mixed, non-uniform": ("tiny_cpu", 20_000, {"vpt": [8, 8, 4, 4, 2, 2], "lora": [4, 4, 4, 4]}),
    "pgn with lora": ("noah_pgn_border_cpu", 400_000, PGN_LORA),
}


def distance(space: SearchSpace, s: Subnet, t: Subnet) -> float:
    d = 0.0
    for kind, ms in space.modules.items():
        a, b = s[kind], t[kind]
        if kind == "pgn":
            d += sum(x != y for x, y in zip(a or (None,) * 5, b or (None,) * 5, strict=True))
            continue
        n = max(len(a), len(b))
        a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
        d += sum(abs(x - y) for x, y in zip(a, b, strict=True)) / ms.max_dim
    return d


def found(space: SearchSpace, peak: Subnet, name: str, options: dict, seed: int) -> bool:
    algo = make_search(name, space, seed=seed, **options)
    while not algo.finished:
        batch = algo.ask()
        if not batch:
            break
        algo.tell([Evaluated(s, -distance(space, s, peak), algo.cost(s), algo.round)
                   for s in batch])  # fmt: skip
    return algo.best(1)[0].subnet == peak


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--json", required=True)


def run(args: argparse.Namespace) -> int:
    results = []
    for case, (space_name, budget, peak_data) in CASES.items():
        space = replace(load_space(space_name), budget=Budget(params=Bounds(None, budget)))
        peak = Subnet.from_data(peak_data)
        assert space.admits(peak), case
        for label, (name, options) in ALGORITHMS.items():
            start = time.time()
            hits = sum(found(space, peak, name, options, seed) for seed in range(args.seeds))
            results.append(
                {
                    "case": case,
                    "peak": str(peak),
                    "algorithm": label,
                    "found": hits,
                    "seeds": args.seeds,
                    "fraction": hits / args.seeds,
                    "seconds": round(time.time() - start, 1),
                }
            )
            print(f"{case:28s} {label:15s} {hits}/{args.seeds}", flush=True)
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, CPU",
        "settings": {
            "evolution": EVOLUTION,
            "tpe": ALGORITHMS["optuna-tpe"][1],
            "budgets": {c: b for c, (_, b, _) in CASES.items()},
        },
        "results": results,
    }
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0
