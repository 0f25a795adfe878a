"""Does the search itself help? (issue 10's one-seed cut)

Per mini-VTAB task, with one supernet trained as the pipeline's supernet stage trains it
(NOAH's sampling):
- ranking fidelity: ``--subnets`` random subnets inside the budget, scored on val200 with
  weights inherited from the supernet, and the same subnets each trained alone from the
  pretrained backbone (on train800, scored on val200); Kendall's tau between the two;
- controls at the same number of evaluated candidates: NOAH's evolutionary search against
  random search, and against the largest uniform subnet inside the budget (every module on
  every layer, one dim per module, most parameters that fit). Each winner is retrained on
  train800val200 and tested once; 95% intervals are binomial (normal approximation) on the
  test split, and the difference to evolution carries its own (unpaired, conservative).

Everything runs in this process (no Ray, no MLflow): it measures the method, not the platform.

Run: python -m benchmarks controls [--tasks digits dsprites_loc] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.recipes import (
    WEIGHT_DECAY,
    in_budget_draws,
    largest_uniform,
    space_with_budget,
    supernet_settings,
    task_data,
    train_alone,
    train_supernet,
)
from benchmarks.stats import interval, tau_p
from nas.search import make_search
from nas.space.cost import subnet_params
from nas.space.search_space import SearchSpace
from nas.space.subnet import Subnet
from nas.spec.stages import TrainingSettings
from nas.training.evaluate import evaluate, evaluate_candidates

#: The search of this cut: 4 generations of 16 (64 candidates).
EVOLUTION = {"generations": 4, "population": 16, "top_k": 4, "mutations": 6, "crossovers": 6}


def fidelity(space: SearchSpace, data, score, args) -> dict[str, Any]:
    """Inherited val200 accuracy against trained-alone val200 accuracy, ``args.subnets``
    random in-budget subnets."""
    mean, std = space.backbone.normalisation()
    sampled = in_budget_draws(space, args.subnets, args.seed + 1)
    inherited = score(sampled)
    schedule = TrainingSettings(epochs=args.alone_epochs, warmup_epochs=1)
    cfg = schedule.train_config(lr=args.lr, weight_decay=WEIGHT_DECAY, seed=args.seed)
    alone = [
        evaluate(train_alone(space, s, data["train"], cfg), data["val"], mean=mean, std=std)
        for s in sampled
    ]
    tau, p_value = tau_p(inherited, alone)
    return {
        "kendall_tau": tau,
        "kendall_p": p_value,
        "fidelity": [
            {"subnet": str(s), "inherited": a, "alone": b}
            for s, a, b in zip(sampled, inherited, alone, strict=True)
        ],
    }


def winners(space: SearchSpace, score, seed: int) -> tuple[dict[str, Subnet], int]:
    """Evolution's best, random search's best at as many candidates, the largest in budget."""
    evo = make_search("evolution", space, seed=seed, **EVOLUTION)
    evo.run(score)
    n = len(evo.history)
    rnd = make_search("random", space, seed=seed, num_candidates=n, batch_size=n)
    rnd.run(score)
    found = {
        "evolution": evo.best(1)[0].subnet,
        "random": rnd.best(1)[0].subnet,
        "largest in budget": largest_uniform(space),
    }
    return found, n


def one_task(task: str, data_root: Path, args, space: SearchSpace) -> dict[str, Any]:
    data = task_data(task, data_root, space)
    mean, std = space.backbone.normalisation()
    started = time.time()
    settings = supernet_settings("noah", args.supernet_epochs, warmup_epochs=1)
    supernet, _, _ = train_supernet(space, data["train"], settings, args.lr, args.seed)

    def score(subnets):
        return evaluate_candidates(supernet, subnets, data["val"], mean=mean, std=std)

    ranking = fidelity(space, data, score, args)
    found, n = winners(space, score, args.seed)
    schedule = TrainingSettings(epochs=args.retrain_epochs, warmup_epochs=1)
    cfg = schedule.train_config(lr=args.lr, weight_decay=WEIGHT_DECAY, seed=args.seed)
    rows, n_test = {}, len(data["test"])
    for name, subnet in found.items():
        model = train_alone(space, subnet, data["trainval"], cfg)
        acc = evaluate(model, data["test"], mean=mean, std=std)
        rows[name] = {
            "subnet": str(subnet),
            "params": subnet_params(subnet, space.geometry),
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
        **ranking,
        "controls": rows,
        "test_images": n_test,
        "seconds": time.time() - started,
    }


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", nargs="+", default=["digits", "dsprites_loc"])
    parser.add_argument("--budget", type=int, default=20000, help="max trainable module params")
    parser.add_argument("--subnets", type=int, default=20)
    parser.add_argument("--supernet-epochs", type=int, default=10)
    parser.add_argument("--alone-epochs", type=int, default=6)
    parser.add_argument("--retrain-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")


def run(args: argparse.Namespace) -> int:
    space = space_with_budget(args.budget)
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "experiment")}
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{torch.get_num_threads()} CPU threads",
        "settings": {**settings, "evolution": EVOLUTION},
        "tasks": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
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
