"""The ground truth that a supernet's ranking is measured against (issue 20).

Per mini-VTAB task, a fixed set of in-budget subnets is each trained alone from the pretrained
backbone with the retraining recipe (train800 + val200, as the pipeline retrains a winner) over
several seeds, and scored on the test split (this measurement may look at test; nothing here
ever chooses anything). Results are cached by (task, subnet, recipe, seed) in one JSON file per
task under ``benchmarks/results/ground_truth/``, written after every training, so that

- every supernet variant meets the same ground truth, however many are measured later;
- a stopped run continues where it stopped (and several tasks can run in parallel processes);
- the committed cache lets anyone recompute the taus without retraining 600 models.

Run: python benchmarks/ground_truth.py --tasks digits clevr_count [--subnets 30] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import os
import random
import statistics
import time
from itertools import combinations
from pathlib import Path

import torch
from scipy.stats import kendalltau

from nas.data.decode import DecodedSplit, decode_split
from nas.data.lists import read_vtab
from nas.data.mini_vtab import prepare
from nas.families.vit.model import PromptedViT
from nas.space.search_space import SearchSpace, load_space
from nas.space.subnet import Subnet
from nas.training.evaluate import evaluate
from nas.training.train import TrainConfig, train

RESULTS = Path(__file__).resolve().parent / "results" / "ground_truth"
#: The retraining recipe of the mini-VTAB benchmarks (experiments/benchmark_mini_vtab.yaml):
#: 15 epochs, batch 64, 2 warm-up epochs, at the supernet's most common swept rate (5e-3).
RECIPE = TrainConfig(epochs=15, batch_size=64, lr=5e-3, weight_decay=1e-4, warmup_epochs=2)
BUDGET = 20_000  # trainable module parameters, as in the mini-VTAB tables (7.8% of tiny_cpu)
SUBNET_SEED = 20  # the draw of the ground-truth subnets


def space_with_budget(max_params: int = BUDGET, name: str = "tiny_cpu") -> SearchSpace:
    space = load_space(name)
    params = dataclasses.replace(space.budget.params, high=float(max_params))
    return dataclasses.replace(space, budget=dataclasses.replace(space.budget, params=params))


def ground_truth_subnets(space: SearchSpace, n: int, seed: int = SUBNET_SEED) -> list[Subnet]:
    """``n`` distinct in-budget subnets drawn as the search draws its random candidates
    (NOAH's per-layer sampling, rejected outside the budget)."""
    rng = random.Random(seed)
    out: list[Subnet] = []
    while len(out) < n:
        s = space.sample(rng)
        if space.admits(s) and s not in out:
            out.append(s)
    return out


def recipe_key(cfg: TrainConfig = RECIPE) -> str:
    blob = json.dumps({k: v for k, v in cfg.to_dict().items() if k != "seed"}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def task_data(task: str, data_root: Path, space: SearchSpace) -> dict[str, DecodedSplit]:
    """The task's splits, prepared as the pipeline prepares a mini-VTAB task (alone, seed 0),
    so that the ground truth holds for the pipeline's own data."""
    folder = data_root / task
    if not (folder / "test.txt").is_file():
        staging = folder.parent / f".{task}.{os.getpid()}.staging"
        prepare(staging, (task,), log=lambda *_: None)
        if not (folder / "test.txt").is_file():  # another process may have finished first
            os.replace(staging / task, folder)
    splits = read_vtab(folder)
    g = space.geometry
    size = g.image_size
    return {
        k: decode_split(splits[k], size, g.in_chans) for k in ("train", "val", "trainval", "test")
    }


class Cache:
    """Test accuracies of subnets trained alone, one JSON file per task, rewritten atomically
    after every new entry."""

    def __init__(self, task: str, folder: Path = RESULTS) -> None:
        self.path = folder / f"{task}.json"
        self.task = task
        self.entries: dict[str, dict] = {}
        self.recipes: dict[str, dict] = {}
        self.refresh()

    def refresh(self) -> None:
        """Take in what other processes wrote since (they fill the same file)."""
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.entries = {**data.get("entries", {}), **self.entries}
        self.recipes = {**data.get("recipes", {}), **self.recipes}

    @staticmethod
    def key(subnet: Subnet, recipe: str, seed: int) -> str:
        return f"{subnet}|{recipe}|{seed}"

    def get(self, subnet: Subnet, recipe: str, seed: int) -> float | None:
        entry = self.entries.get(self.key(subnet, recipe, seed))
        return None if entry is None else float(entry["test_acc"])

    def put(
        self,
        subnet: Subnet,
        recipe: str,
        seed: int,
        acc: float,
        seconds: float,
        lr: float = RECIPE.lr,
    ) -> None:
        self.recipes[recipe] = dataclasses.replace(RECIPE, lr=lr).to_dict()
        self.entries[self.key(subnet, recipe, seed)] = {
            "subnet": subnet.to_data(),
            "seed": seed,
            "recipe": recipe,
            "test_acc": acc,
            "seconds": round(seconds, 1),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Several processes may fill one task's file: merge with what is there, under a lock.
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.is_file():
                there = json.loads(self.path.read_text())
                self.entries = {**there.get("entries", {}), **self.entries}
                self.recipes = {**there.get("recipes", {}), **self.recipes}
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            doc = {"task": self.task, "recipes": self.recipes, "entries": self.entries}
            tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
            os.replace(tmp, self.path)


def train_alone(
    space: SearchSpace,
    subnet: Subnet,
    data: dict[str, DecodedSplit],
    seed: int,
    lr: float = RECIPE.lr,
) -> float:
    """The retraining recipe (at ``lr``) on train+val from the pretrained backbone; test
    accuracy."""
    classes = data["trainval"].num_classes
    mean, std = space.backbone.normalisation()
    torch.manual_seed(seed)
    model = PromptedViT.for_subnet(
        space.backbone.create(classes), subnet, space.options(), space.backbone
    )
    cfg = dataclasses.replace(RECIPE, seed=seed, lr=lr)
    train(model, data["trainval"], cfg, mean=mean, std=std)
    return evaluate(model, data["test"], mean=mean, std=std)


def measure(
    task: str,
    space: SearchSpace,
    subnets: list[Subnet],
    seeds: list[int],
    data_root: Path,
    log=print,
    reverse: bool = False,
) -> dict[Subnet, list[float]]:
    """Every (subnet, seed) pair's test accuracy, from the cache or trained now. ``reverse``
    walks the subnets from the last, so that a second process on the same task and seeds meets
    the first in the middle instead of training what it trains."""
    cache = Cache(task)
    recipe = recipe_key()
    data = None
    out: dict[Subnet, list[float]] = {s: [] for s in subnets}
    for seed in seeds:  # seed by seed: a partial run already ranks every subnet
        order = list(enumerate(subnets))
        for i, subnet in reversed(order) if reverse else order:
            acc = cache.get(subnet, recipe, seed)
            if acc is None:
                cache.refresh()
                acc = cache.get(subnet, recipe, seed)
            if acc is None:
                data = data or task_data(task, data_root, space)
                started = time.time()
                acc = train_alone(space, subnet, data, seed)
                cache.put(subnet, recipe, seed, acc, time.time() - started)
                log(f"{task} seed {seed} [{i + 1}/{len(subnets)}]: {acc:.4f} {subnet}", flush=True)
            out[subnet].append(acc)
    return out


def noise_ceiling(truth: dict[Subnet, list[float]]) -> float:
    """Mean Kendall tau between the ground truth's seeds, pair by pair: how well one training
    seed ranks the subnets as another does (the seed average is steadier than one seed)."""
    columns = list(zip(*truth.values(), strict=True))
    taus = [kendalltau(a, b)[0] for a, b in combinations(columns, 2)]
    return statistics.mean(taus) if taus else float("nan")


def seed_mean(truth: dict[Subnet, list[float]]) -> list[float]:
    return [statistics.mean(v) for v in truth.values()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--subnets", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", default="/tmp/nas-mini-vtab", help="prepared tasks go here")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--reverse", action="store_true", help="last subnet first (a second process's order)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    space = space_with_budget()
    subnets = ground_truth_subnets(space, args.subnets)
    Path(args.data).mkdir(parents=True, exist_ok=True)
    for task in args.tasks:
        truth = measure(task, space, subnets, args.seeds, Path(args.data), reverse=args.reverse)
        means = seed_mean(truth)
        print(
            f"{task}: {len(truth)} subnets x {len(args.seeds)} seeds; test acc "
            f"{min(means):.3f}-{max(means):.3f}; seeds agree at tau {noise_ceiling(truth):.2f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
