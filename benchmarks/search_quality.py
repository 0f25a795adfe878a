"""Does the search itself help? (issue 10)

Per mini-VTAB task, with one supernet trained as the pipeline trains it:
- ranking fidelity: ``--subnets`` random subnets inside the budget, scored on val200 with
  weights inherited from the supernet, and the same subnets each trained alone from the
  pretrained backbone (on train800, scored on val200); Kendall's tau between the two;
- controls at the same number of evaluated candidates: NOAH's evolutionary search against
  random search, and against the largest uniform subnet inside the budget (every module on
  every layer, one dim per module, most parameters that fit). Each winner is retrained on
  train800val200 and tested once; 95% intervals are binomial (normal approximation) on the
  test split, and the difference to evolution carries its own (unpaired, conservative).

Everything runs in this process (no Ray, no MLflow): it measures the method, not the platform.

Run: python benchmarks/search_quality.py [--tasks digits dsprites_loc] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import random
import tempfile
import time
from pathlib import Path

import torch
from scipy.stats import kendalltau

from nas.cost import subnet_params
from nas.data.decode import decode_split
from nas.data.formats import read_vtab
from nas.data.mini_vtab import prepare
from nas.model import PromptedViT
from nas.search import make_search
from nas.space import SearchSpace, load_space
from nas.subnet import Subnet
from trainers.train import TrainConfig, evaluate, evaluate_candidates, train


def with_budget(space: SearchSpace, max_params: int) -> SearchSpace:
    params = dataclasses.replace(space.budget.params, high=float(max_params))
    return dataclasses.replace(space, budget=dataclasses.replace(space.budget, params=params))


def largest_uniform(space: SearchSpace) -> Subnet:
    """Every module at its deepest, one dim per module; the most parameters in budget."""
    kinds = sorted(space.modules)
    best, best_params = None, -1
    for dims in itertools.product(*(space.modules[k].dims for k in kinds)):
        depth = {k: max(space.modules[k].depths) for k in kinds}
        subnet = Subnet.from_data(
            {k: {"depth": depth[k], "dims": d} for k, d in zip(kinds, dims, strict=True) if d}
        )
        params = subnet_params(subnet, space.geometry)
        if space.admits(subnet) and params > best_params:
            best, best_params = subnet, params
    assert best is not None, "no uniform subnet fits the budget"
    return best


def interval(p: float, n: int) -> float:
    """Half-width of a 95% normal-approximation interval of an accuracy over n images."""
    return 1.96 * math.sqrt(max(p * (1 - p), 1e-12) / n)


def one_task(task: str, data_root: Path, args, space: SearchSpace) -> dict:
    splits = read_vtab(data_root / task)
    g = space.geometry
    size = g.patch_size * round(g.num_patches**0.5)
    data = {k: decode_split(splits[k], size, g.in_chans) for k in ("train", "val", "trainval")}
    data["test"] = decode_split(splits["test"], size, g.in_chans)
    classes = data["train"].num_classes
    mean, std = space.backbone.normalisation()
    started = time.time()

    def config(epochs: int, seed: int) -> TrainConfig:
        return TrainConfig(epochs=epochs, lr=args.lr, weight_decay=1e-4, warmup_epochs=1, seed=seed)

    torch.manual_seed(args.seed)
    supernet = PromptedViT.supernet(space, classes, space.backbone.create(classes))
    train(
        supernet,
        data["train"],
        config(args.supernet_epochs, args.seed),
        mean=mean,
        std=std,
        sample_subnet=space.sample,
    )

    def score(subnets):
        return evaluate_candidates(supernet, subnets, data["val"], mean=mean, std=std)

    def train_alone(subnet: Subnet, split: str, epochs: int) -> PromptedViT:
        torch.manual_seed(args.seed)
        model = PromptedViT.for_subnet(
            space.backbone.create(classes), subnet, space.options(), space.backbone
        )
        train(model, data[split], config(epochs, args.seed), mean=mean, std=std)
        return model

    # Ranking fidelity.
    rng = random.Random(args.seed + 1)
    sampled: list[Subnet] = []
    while len(sampled) < args.subnets:
        s = space.sample(rng)
        if space.admits(s) and s not in sampled:
            sampled.append(s)
    inherited = score(sampled)
    alone = [
        evaluate(train_alone(s, "train", args.alone_epochs), data["val"], mean=mean, std=std)
        for s in sampled
    ]
    tau, p_value = kendalltau(inherited, alone)

    # Controls at the same number of evaluated candidates.
    evo = make_search("evolution", space, seed=args.seed, **args.evolution)
    evo.run(score)
    n = len(evo.history)
    rnd = make_search("random", space, seed=args.seed, num_candidates=n, batch_size=n)
    rnd.run(score)
    winners = {
        "evolution": evo.best(1)[0].subnet,
        "random": rnd.best(1)[0].subnet,
        "largest in budget": largest_uniform(space),
    }
    rows = {}
    n_test = len(data["test"])
    for name, subnet in winners.items():
        model = train_alone(subnet, "trainval", args.retrain_epochs)
        acc = evaluate(model, data["test"], mean=mean, std=std)
        rows[name] = {
            "subnet": str(subnet),
            "params": subnet_params(subnet, g),
            "val_acc_inherited": score([subnet])[0],
            "test_acc": acc,
            "ci95": interval(acc, n_test),
        }
    evo_acc = rows["evolution"]["test_acc"]
    for name, row in rows.items():
        if name != "evolution":
            row["evolution_minus_this"] = evo_acc - row["test_acc"]
            row["difference_ci95"] = math.sqrt(
                interval(evo_acc, n_test) ** 2 + interval(row["test_acc"], n_test) ** 2
            )
    return {
        "task": task,
        "candidates": n,
        "kendall_tau": tau,
        "kendall_p": p_value,
        "fidelity": [
            {"subnet": str(s), "inherited": a, "alone": b}
            for s, a, b in zip(sampled, inherited, alone, strict=True)
        ],
        "controls": rows,
        "test_images": n_test,
        "seconds": time.time() - started,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", nargs="+", default=["digits", "dsprites_loc"])
    parser.add_argument("--budget", type=int, default=20000, help="max trainable module params")
    parser.add_argument("--subnets", type=int, default=20)
    parser.add_argument("--supernet-epochs", type=int, default=10)
    parser.add_argument("--alone-epochs", type=int, default=6)
    parser.add_argument("--retrain-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    args.evolution = {"generations": 4, "population": 16, "top_k": 4, "mutations": 6}
    args.evolution["crossovers"] = 6
    space = with_budget(load_space("tiny_cpu"), args.budget)
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{torch.get_num_threads()} CPU threads",
        "settings": {k: v for k, v in vars(args).items() if k not in ("json",)},
        "tasks": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        prepare(Path(tmp), tuple(args.tasks), log=lambda *_: None)
        for task in args.tasks:
            results["tasks"].append(one_task(task, Path(tmp), args, space))
            r = results["tasks"][-1]
            print(
                f"{task}: tau {r['kendall_tau']:.2f} (p {r['kendall_p']:.3f}); "
                + "; ".join(
                    f"{k} {v['test_acc']:.3f} ± {v['ci95']:.3f} ({v['params']:,} params)"
                    for k, v in r["controls"].items()
                ),
                flush=True,
            )
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
