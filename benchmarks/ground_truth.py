"""The ground truth that a supernet's ranking is measured against (issue 20).

Per mini-VTAB task, a fixed set of in-budget subnets is each trained alone from the pretrained
backbone with the retraining recipe (train800 + val200, as the pipeline retrains a winner) over
several seeds, and scored on the test split (this measurement may look at test; nothing here
ever chooses anything). Results are cached by (task, subnet, recipe, seed) in one JSON file per
task under ``benchmarks/results/ground_truth/`` (``benchmarks.cache.TrainedAlone``), written
after every training, so that

- every supernet variant meets the same ground truth, however many are measured later;
- a stopped run continues where it stopped (and several tasks can run in parallel processes);
- the committed cache lets anyone recompute the taus without retraining 600 models.

Run: python -m benchmarks ground-truth --tasks digits clevr_count [--subnets 30] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.cache import RESULTS, TrainedAlone
from benchmarks.recipes import (
    RECIPE,
    ground_truth_subnets,
    recipe_key,
    retrained,
    space_with_budget,
    task_data,
)
from benchmarks.stats import noise_ceiling, seed_mean
from nas.space.search_space import SearchSpace
from nas.space.subnet import Subnet

#: The seeds of the committed ground truth, in the order they were measured.
SEEDS = (0, 1, 2)


def cache_of(task: str, results: Path = RESULTS) -> TrainedAlone:
    """The task's trained-alone accuracies (the ground truth's and the retrained controls')."""
    return TrainedAlone(task, results / "ground_truth")


class Retrainer:
    """Subnets retrained on one task by the recipe at a rate, from the cache or trained now
    (and cached); with ``report_only``, a missing one raises ``NotMeasured`` instead."""

    def __init__(self, task: str, space: SearchSpace, data_root: Path, results: Path) -> None:
        self.task, self.space, self.data_root = task, space, data_root
        self.cache = cache_of(task, results)
        self.data: dict | None = None

    def splits(self) -> dict:
        self.data = self.data or task_data(self.task, self.data_root, self.space)
        return self.data

    def cached(self, subnet: Subnet, seed: int, lr: float = RECIPE.lr) -> float | None:
        recipe = recipe_key(dataclasses.replace(RECIPE, lr=lr))
        acc = self.cache.get(subnet, recipe, seed)
        if acc is None:
            self.cache.refresh()  # another process may have trained it since
            acc = self.cache.get(subnet, recipe, seed)
        return acc

    def __call__(self, subnet: Subnet, seed: int, lr: float = RECIPE.lr) -> float:
        acc = self.cached(subnet, seed, lr)
        if acc is None:
            started = time.time()
            acc = retrained(self.space, subnet, self.splits(), seed, lr=lr)
            recipe = dataclasses.replace(RECIPE, lr=lr)
            self.cache.put(
                subnet, recipe_key(recipe), recipe.to_dict(), seed, acc, time.time() - started
            )
        return acc


def measure(
    task: str,
    space: SearchSpace,
    subnets: list[Subnet],
    seeds: list[int],
    data_root: Path,
    results: Path = RESULTS,
    log: Callable[..., None] = print,
    reverse: bool = False,
) -> dict[Subnet, list[float]]:
    """Every (subnet, seed) pair's test accuracy, from the cache or trained now. ``reverse``
    walks the subnets from the last, so that a second process on the same task and seeds meets
    the first in the middle instead of training what it trains."""
    retrain = Retrainer(task, space, data_root, results)
    out: dict[Subnet, list[float]] = {s: [] for s in subnets}
    for seed in seeds:  # seed by seed: a partial run already ranks every subnet
        order = list(enumerate(subnets))
        for i, subnet in reversed(order) if reverse else order:
            known = retrain.cached(subnet, seed) is not None
            acc = retrain(subnet, seed)
            if not known:
                log(f"{task} seed {seed} [{i + 1}/{len(subnets)}]: {acc:.4f} {subnet}", flush=True)
            out[subnet].append(acc)
    return out


def truth_of(task: str, subnets: list[Subnet], results: Path = RESULTS) -> dict:
    """The cached trained-alone accuracies of ``subnets`` over the seeds that every one of
    them has (``SEEDS`` in order); empty while some subnet has none."""
    cache, recipe = cache_of(task, results), recipe_key()
    truth = {s: [cache.get(s, recipe, seed) for seed in SEEDS] for s in subnets}
    seeds = min(next((i for i, a in enumerate(v) if a is None), len(v)) for v in truth.values())
    return {s: v[:seeds] for s, v in truth.items()} if seeds else {}


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--subnets", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--data", default="/tmp/nas-mini-vtab", help="prepared tasks go here")
    parser.add_argument("--results", type=Path, default=RESULTS, help="cache folder")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--reverse", action="store_true", help="last subnet first (a second process's order)"
    )


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    space = space_with_budget()
    subnets = ground_truth_subnets(space, args.subnets)
    Path(args.data).mkdir(parents=True, exist_ok=True)
    for task in args.tasks:
        truth = measure(
            task, space, subnets, args.seeds, Path(args.data), args.results, reverse=args.reverse
        )
        means = seed_mean(truth)
        print(
            f"{task}: {len(truth)} subnets x {len(args.seeds)} seeds; test acc "
            f"{min(means):.3f}-{max(means):.3f}; seeds agree at tau {noise_ceiling(truth):.2f}",
            flush=True,
        )
    return 0
