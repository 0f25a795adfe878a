"""What the search is worth (issue 26): per (task, seed), the searched winner against a random
in-budget subnet (what a user gets with no search), random search at as many candidates, the
largest subnet in budget and the best single module (with its own learning-rate sweep), every
one retrained with the ground truth's recipe (shared cache) and tested once. The supernet of
``--variant`` is trained as the pipeline's supernet stage trains it; ``--report`` only reads
the caches (what is measured so far).

Run: python -m benchmarks value --variant sandwich_all --tasks T --seeds S --json OUT
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.cache import RESULTS, cached_run
from benchmarks.ground_truth import Retrainer, truth_of
from benchmarks.recipes import (
    RECIPE,
    SWEEP,
    SWEEP_LRS,
    VARIANTS,
    ground_truth_subnets,
    largest_single,
    largest_uniform,
    space_with_budget,
    supernet_settings,
    sweep_key,
    sweep_point,
    train_supernet,
)
from benchmarks.stats import noise_ceiling, seed_mean, tau
from benchmarks.value_report import OWN_LR_ROLES, noah_pgn_versus_pgn, summarise, table
from nas.search import make_search
from nas.space.search_space import SearchSpace
from nas.space.subnet import Subnet
from nas.training.evaluate import evaluate_candidates

#: The mini-VTAB benchmark's search (experiments/benchmark_mini_vtab.yaml): 100 candidates.
EVOLUTION = {"generations": 5, "population": 20, "top_k": 5, "mutations": 8, "crossovers": 8}


class NotMeasured(Exception):
    """``value --report`` met a run or a retraining that the cache does not hold yet."""


@dataclass
class Pair:
    """One (task, seed): its space, the ground-truth subnets, and its cached retrainings."""

    task: str
    seed: int
    args: argparse.Namespace
    space: SearchSpace = field(init=False)
    subnets: list[Subnet] = field(init=False)
    retrain: Retrainer = field(init=False)

    def __post_init__(self) -> None:
        self.space = space_with_budget()
        self.subnets = ground_truth_subnets(self.space, self.args.subnets)
        self.retrain = Retrainer(self.task, self.space, Path(self.args.data), self.args.results)

    def missing(self, what: str) -> NotMeasured:
        return NotMeasured(f"{self.task} seed {self.seed}: {what}")

    def tested(self, subnet: Subnet, lr: float = RECIPE.lr) -> float:
        """``subnet`` retrained at ``lr`` and tested (cached)."""
        if self.args.report and self.retrain.cached(subnet, self.seed, lr) is None:
            raise self.missing(f"{subnet} at lr {lr:g} not retrained")
        return self.retrain(subnet, self.seed, lr)

    def own_lr(self, subnet: Subnet) -> float:
        """``subnet``'s own rate: the single modules' sweep (SWEEP_LRS, on train800, chosen
        on val200, ties to the smaller rate), each point cached."""

        def point(lr: float) -> float:
            def compute() -> dict[str, float]:
                if self.args.report:
                    raise self.missing(f"{subnet} not swept at lr {lr:g}")
                data = self.retrain.splits()
                return {"val": sweep_point(self.space, subnet, data, self.seed, lr)}

            key = sweep_key(subnet, self.seed, lr)
            return cached_run(self.args.results, "lr_sweep", self.task, key, compute)["val"]

        val = {lr: point(lr) for lr in SWEEP_LRS}
        return max(val, key=lambda lr: (val[lr], -lr))


def search(pair: Pair) -> dict[str, Any]:
    """The supernet, the searched winner and its controls, the single modules' sweeps and the
    ground-truth subnets' inherited val200 accuracies (cached per variant, epochs, seed, lr)."""
    args, space, seed = pair.args, pair.space, pair.seed

    def compute() -> dict[str, Any]:
        if args.report:
            raise pair.missing(f"no {args.variant} search yet")
        data = pair.retrain.splits()
        mean, std = space.backbone.normalisation()
        settings = supernet_settings(args.variant, args.epochs)
        supernet, sampling, seconds = train_supernet(space, data["train"], settings, args.lr, seed)

        def score(subnets):
            return evaluate_candidates(supernet, subnets, data["val"], mean=mean, std=std)

        evo = make_search("evolution", space, seed=seed, **EVOLUTION)
        evo.run(score)
        n = len(evo.history)
        rnd = make_search("random", space, seed=seed, num_candidates=n, batch_size=n)
        rnd.run(score)
        rng = random.Random(1_000 + seed)  # what a user gets with no search: any subnet in budget
        random_subnet = next(s for s in iter(lambda: space.sample(rng), None) if space.admits(s))
        winners = {
            "searched": evo.best(1)[0].subnet,
            "random_search": rnd.best(1)[0].subnet,
            "random_subnet": random_subnet,
            "largest_in_budget": largest_uniform(space),
        }
        singles = {}
        for kind in space.modules:  # each with its own learning-rate sweep on train/val
            subnet = largest_single(space, kind)
            val = {lr: sweep_point(space, subnet, data, seed, lr) for lr in SWEEP_LRS}
            best_lr = max(val, key=lambda lr: (val[lr], -lr))
            singles[kind] = {"subnet": subnet.to_data(), "val": val, "lr": best_lr}
        return {
            "variant": args.variant,
            "settings": sampling,
            "supernet_seconds": round(seconds, 1),
            "candidates": n,
            "winners": {k: v.to_data() for k, v in winners.items()},
            "singles": singles,
            # the ground-truth subnets' inherited val200 accuracies: tau is computed against
            # whatever ground truth the cache holds when the report is made
            "inherited_val_gt": score(pair.subnets),
        }

    key = f"{args.variant}|{args.epochs}|{seed}|{args.lr:g}"
    return cached_run(args.results, "search_value", pair.task, key, compute)


def own_rates(pair: Pair, winners: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The controls retrained at their own swept rate, where asked for (or, reporting, where
    measured)."""
    own: dict[str, dict[str, float]] = {}
    for role in OWN_LR_ROLES:
        if role not in pair.args.own_lr and not pair.args.report:
            continue
        try:
            subnet = Subnet.from_data(winners[role])
            lr = pair.own_lr(subnet)
            own[role] = {"lr": lr, "test": pair.tested(subnet, lr)}
        except NotMeasured:
            continue
    return own


def value_row(task: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The search's winner against its controls on one task and seed, every one retrained
    and tested once. With ``args.report`` only the caches are read (``NotMeasured`` when
    something is missing)."""
    pair = Pair(task, seed, args)
    truth = truth_of(task, pair.subnets, args.results)
    run = search(pair)
    tests = {k: pair.tested(Subnet.from_data(v)) for k, v in run["winners"].items()}
    own = own_rates(pair, run["winners"])
    single_tests = {
        kind: pair.tested(Subnet.from_data(v["subnet"]), v["lr"])
        for kind, v in run["singles"].items()
    }
    best_single = max(run["singles"], key=lambda k: max(run["singles"][k]["val"].values()))
    inherited = run.get("inherited_val_gt")
    kendall = tau(inherited, seed_mean(truth)) if truth and inherited else None
    return {
        "task": task,
        "seed": seed,
        "kendall_tau": run.get("kendall_tau") if kendall is None else kendall,
        "tau_noise_ceiling": noise_ceiling(truth) if truth else None,
        "searched_test": tests["searched"],
        "random_subnet_test": tests["random_subnet"],
        "random_search_test": tests["random_search"],
        "largest_in_budget_test": tests["largest_in_budget"],
        "best_single_module_test": single_tests[best_single],
        "best_single_module": best_single,
        "single_module_tests": single_tests,
        **{f"{role}_own_lr_test": own[role]["test"] for role in own},
        **{f"{role}_own_lr": own[role]["lr"] for role in own},
        "winners": run["winners"],
    }


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, default=RESULTS, help="cache folder")
    parser.add_argument("--tasks", nargs="+", default=["clevr_count", "mnist5k"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variant", default="noah", choices=sorted(VARIANTS))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=5e-3, help="the supernet's swept rate")
    parser.add_argument("--subnets", type=int, default=30)
    parser.add_argument("--data", default="/tmp/nas-mini-vtab")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the issue's JSON shape here")
    parser.add_argument("--markdown", default=None, help="write the tables as markdown here")
    parser.add_argument(
        "--report", action="store_true", help="only read the cache: what is measured so far"
    )
    parser.add_argument(
        "--own-lr",
        nargs="+",
        default=[],
        choices=OWN_LR_ROLES,
        help="also retrain these at their own swept rate (as the single modules are)",
    )
    parser.add_argument(
        "--pgn-store",
        default=None,
        help="the MLflow store of `nas run experiments/benchmark_mini_vtab_pgn.yaml`: "
        "its NOAH+PGN winner against PGN alone gives noah_pgn_minus_pgn_points",
    )


def settings(args: argparse.Namespace, rows: list[dict], pgn: dict | None) -> dict[str, Any]:
    """What the JSON records of how its rows were measured."""
    return {
        "variant": args.variant,
        "supernet_epochs": args.epochs,
        "supernet_lr": args.lr,
        "evolution": EVOLUTION,
        "retrain": RECIPE.to_dict(),
        "single_module_sweep": {"lrs": SWEEP_LRS, "epochs": SWEEP.epochs},
        # the same sweep gives the *_own_lr_test columns their rates
        "own_lr_roles": [r for r in OWN_LR_ROLES if any(f"{r}_own_lr" in x for x in rows)],
        "date": time.strftime("%Y-%m-%d"),
        # the runs' own threads (--report reads caches: pass the runs' --threads)
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch thread(s) per process",
        "pairs_measured": len(rows),
        "noah_pgn": {k: v for k, v in pgn.items() if k != "line"} if pgn else None,
    }


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    Path(args.data).mkdir(parents=True, exist_ok=True)
    # read first: a wrong store fails before the (long) runs, not after them
    pgn = noah_pgn_versus_pgn(args.pgn_store) if args.pgn_store else None
    rows = []
    for task in args.tasks:
        for seed in args.seeds:
            try:
                row = value_row(task, seed, args)
            except NotMeasured as missing:
                print(f"not measured yet: {missing}", flush=True)
                continue
            rows.append(row)
            print(
                f"{task} seed {seed}: searched {row['searched_test']:.3f}, random subnet "
                f"{row['random_subnet_test']:.3f}, random search {row['random_search_test']:.3f}, "
                f"largest {row['largest_in_budget_test']:.3f}, best single "
                f"({row['best_single_module']}) {row['best_single_module_test']:.3f}",
                flush=True,
            )
    summary = summarise(rows)
    for line in summary["lines"]:
        print(line)
    if args.markdown:
        Path(args.markdown).write_text(table(rows, summary))
    if pgn:
        print(pgn["line"])
    if args.json:
        doc = {
            "tasks": rows,
            "summary": {k: v for k, v in summary.items() if k != "lines"},
            # the PGN budget's run (nas run, read from its MLflow store): None if not given
            "noah_pgn_minus_pgn_points": pgn["minus_points"] if pgn else None,
            "settings": settings(args, rows, pgn),
        }
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0
