"""Ranking fidelity of supernet variants against a ground truth that can resolve it (issue 20).

One supernet per variant (``recipes.VARIANTS``: NOAH's sampling, in-budget, size-balanced, the
sandwich rule, in-place distillation, schedule lengths) is trained on train800 exactly as the
pipeline's supernet stage trains it; it scores the ground-truth subnets
(``benchmarks.ground_truth``) with inherited weights on val200 (what the search sees) and on
the test split (the supernet's own fidelity, free of val200's noise). The report gives
Kendall's tau against their seed-averaged trained-alone test accuracy, beside the noise
ceiling (tau between the ground truth's own seeds) and the tau of ranking by size alone.
Results are cached per (task, variant, epochs, seed) in ``results/fidelity/<task>.json``;
``--report`` only prints the table.

Run: python -m benchmarks fidelity --tasks clevr_count --variants noah balanced
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.cache import RESULTS, cached_run, read
from benchmarks.ground_truth import truth_of
from benchmarks.recipes import (
    VARIANTS,
    ground_truth_subnets,
    space_with_budget,
    supernet_settings,
    task_data,
    train_supernet,
)
from benchmarks.stats import noise_ceiling, seed_mean, tau
from nas.families.prompted import PromptedModel
from nas.space.cost import subnet_params
from nas.space.subnet import Subnet
from nas.training.evaluate import score_candidates

#: The ridge penalty of a refitted head, relative to the mean diagonal of the features' Gram
#: matrix (fixed before any measurement; not tuned).
REFIT_RIDGE = 1e-2


@torch.no_grad()
def head_inputs(model: PromptedModel, subnet: Subnet, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """The features the classifier head sees under ``subnet`` (its input), and the labels."""
    (head,) = model.tower.head_modules()
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].double()))
    model.eval()
    previous = model.subnet
    model.set_subnet(subnet)
    labels = []
    try:
        for x, y in batches:
            model(x)
            labels.append(y)
    finally:
        handle.remove()
        model.set_subnet(previous)
    return torch.cat(seen), torch.cat(labels)


def refit_scores(
    model: PromptedModel, subnets: list[Subnet], fit, scored, *, mean, std
) -> list[float]:
    """Each subnet scored with a head of its own instead of the supernet's shared one: a ridge
    classifier (one-hot targets, closed form) fitted on ``fit``'s features under the subnet,
    its accuracy on ``scored``. The shared head is a compromise over every subnet the supernet
    trained; a refitted one asks only how good the subnet's features are."""
    from nas.data.loader import TensorLoader

    fit_batches = list(TensorLoader(fit, 256, mean, std))
    scored_batches = list(TensorLoader(scored, 256, mean, std))
    out = []
    for subnet in subnets:
        x, y = head_inputs(model, subnet, fit_batches)
        xs, ys = head_inputs(model, subnet, scored_batches)
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        gram = xa.T @ xa
        ridge = REFIT_RIDGE * gram.diagonal().mean()
        targets = torch.nn.functional.one_hot(y, fit.num_classes).double()
        w = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=x.dtype), xa.T @ targets)
        logits = torch.cat([xs, torch.ones(len(xs), 1, dtype=x.dtype)], 1) @ w
        out.append((logits.argmax(1) == ys).double().mean().item())
    return out


def variant_run(task: str, variant: str, epochs: int, seed: int, args) -> dict[str, Any]:
    """One supernet of ``variant`` trained on the task; its inherited accuracies of the
    ground-truth subnets on val200 and test, cached."""

    def compute() -> dict[str, Any]:
        space = space_with_budget()
        subnets = ground_truth_subnets(space, args.subnets)
        data = task_data(task, Path(args.data), space)
        settings = supernet_settings(variant, epochs)
        supernet, sampling, seconds = train_supernet(space, data["train"], settings, args.lr, seed)
        mean, std = space.backbone.normalisation()
        val = score_candidates(supernet, subnets, data["val"], mean=mean, std=std)
        test = score_candidates(supernet, subnets, data["test"], mean=mean, std=std)
        run = {
            "variant": variant,
            "settings": sampling,
            "epochs": epochs,
            "seed": seed,
            "lr": args.lr,
            "subnets": [s.to_data() for s in subnets],
            "inherited_val": [s["acc"] for s in val],
            "inherited_test": [s["acc"] for s in test],
            "inherited_val_loss": [s["loss"] for s in val],
            "inherited_test_loss": [s["loss"] for s in test],
            "train_seconds": round(seconds, 1),
            "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d"),
        }
        if args.refit:
            run["refit_ridge"] = REFIT_RIDGE
            for split in ("val", "test"):
                run[f"refit_{split}"] = refit_scores(
                    supernet, subnets, data["train"], data[split], mean=mean, std=std
                )
        return run

    key = f"{variant}|{epochs}|{seed}|{args.lr:g}" + ("|refit" if args.refit else "")
    return cached_run(args.results, "fidelity", task, key, compute)


def run_row(base: dict, run: dict, means: list[float], refit: bool) -> dict[str, Any]:
    """One cached supernet run's taus against the ground truth's seed means."""
    row = {
        **base,
        "variant": run["variant"] + (" + head refit" if refit else ""),
        "epochs": run["epochs"],
        "seed": run["seed"],
        "lr": run["lr"],
        "train_seconds": run["train_seconds"],
    }
    if refit:  # the same supernet scored with a refitted head per subnet
        row["tau_val"] = tau(run["refit_val"], means)
        row["tau_test"] = tau(run["refit_test"], means)
        row["tau_val_shared_head"] = tau(run["inherited_val"], means)
        return row
    row["tau_val"] = tau(run["inherited_val"], means)
    row["tau_test"] = tau(run["inherited_test"], means)
    if "inherited_val_loss" in run:  # ranked by lower inherited loss instead of higher accuracy
        row["tau_val_loss"] = -tau(run["inherited_val_loss"], means)
    return row


def rows_of(tasks: list[str], args) -> list[dict[str, Any]]:
    """Per task and cached supernet run: tau against the seed-averaged ground truth."""
    space = space_with_budget()
    subnets = ground_truth_subnets(space, args.subnets)
    listed = [s.to_data() for s in subnets]
    sizes = [subnet_params(s, space.geometry) for s in subnets]
    rows = []
    for task in tasks:
        truth = truth_of(task, subnets, args.results)
        if not truth:
            continue
        seeds = len(next(iter(truth.values())))
        means = seed_mean(truth)
        runs = read(args.results / "fidelity" / f"{task}.json").get("runs", {})
        base = {
            "task": task,
            "truth_seeds": seeds,
            "tau_noise_ceiling": noise_ceiling(truth) if seeds > 1 else None,
            "truth_range": [min(means), max(means)],
        }
        rows.append({**base, "variant": "by size", "tau_val": tau(sizes, means)})
        for run in runs.values():
            if run["subnets"] != listed:
                continue  # measured on another list of subnets (--subnets)
            if "refit_val" in run:
                rows.append(run_row(base, run, means, refit=True))
                plain = f"{run['variant']}|{run['epochs']}|{run['seed']}|{run['lr']:g}"
                if plain in runs:  # its shared-head scores are that run's row already
                    continue
            rows.append(run_row(base, run, means, refit=False))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per variant and epochs, tau on val200 (test in brackets) per task, averaged
    over supernet seeds, and the mean over tasks; the noise ceiling and size-only rows."""
    tasks = sorted({r["task"] for r in rows})
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        by_task = groups.setdefault((r["variant"], r.get("epochs", 0)), {})
        by_task.setdefault(r["task"], []).append(r)
    ceilings = {r["task"]: r["tau_noise_ceiling"] for r in rows}
    seeds = {r["task"]: r["truth_seeds"] for r in rows}
    head = "| supernet | epochs | " + " | ".join(f"{t} ({seeds[t]} seeds)" for t in tasks)
    lines = [head + " | mean |", "|---|---|" + "---|" * (len(tasks) + 1)]

    def fmt(values: list[float]) -> str:
        return f"{statistics.mean(values):+.2f}" if values else "—"

    known = [ceilings[t] for t in tasks if ceilings[t] is not None]
    cells = [f"{ceilings[t]:.2f}" if ceilings[t] is not None else "—" for t in tasks]
    mean = f"{statistics.mean(known):.2f}" if len(known) == len(tasks) else "—"
    lines.append("| *noise ceiling (seed vs seed)* | | " + " | ".join(cells) + f" | {mean} |")
    for (variant, epochs), by_task in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cells, means = [], []
        for t in tasks:
            runs = by_task.get(t, [])
            val = [r["tau_val"] for r in runs]
            test = [r["tau_test"] for r in runs if "tau_test" in r]
            n = f", {len(runs)} supernets" if len(runs) > 1 else ""
            cells.append(f"{fmt(val)} ({fmt(test)}{n})" if test else fmt(val))
            if val:
                means.append(statistics.mean(val))
        name = "*rank by size*" if variant == "by size" else f"`{variant}`"
        mean = f"{statistics.mean(means):+.2f}" if len(means) == len(tasks) else "—"
        lines.append(f"| {name} | {epochs or ''} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines) + "\n"


def line(r: dict[str, Any]) -> str:
    ceiling = r["tau_noise_ceiling"]
    tail = (
        f"(ceiling {ceiling:.2f}, {r['truth_seeds']} seeds)"
        if ceiling is not None
        else "(1 seed of ground truth)"
    )
    test = f"test {r['tau_test']:+.2f} " if "tau_test" in r else " " * 11
    if "tau_val_loss" in r:
        test += f"val loss {r['tau_val_loss']:+.2f} "
    return (
        f"{r['task']:<13} {r['variant']:<17} {r.get('epochs', ''):>4} "
        f"s{r.get('seed', '')} tau val {r['tau_val']:+.2f} {test}{tail}"
    )


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, default=RESULTS, help="cache folder")
    parser.add_argument("--tasks", nargs="+", default=["clevr_count", "mnist5k"])
    parser.add_argument("--variants", nargs="+", default=["noah"], choices=sorted(VARIANTS))
    parser.add_argument("--epochs", type=int, nargs="+", default=[20])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--lr", type=float, default=5e-3, help="the supernet's swept rate")
    parser.add_argument("--subnets", type=int, default=30)
    parser.add_argument("--data", default="/tmp/nas-mini-vtab")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--report", action="store_true", help="only print the cached table")
    parser.add_argument("--json", help="write the table's rows here")
    parser.add_argument("--markdown", help="write the table as markdown here")
    parser.add_argument(
        "--refit",
        action="store_true",
        help="also score each subnet with a ridge head refitted on train800 under it",
    )


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.report:
        Path(args.data).mkdir(parents=True, exist_ok=True)
        for task in args.tasks:
            for epochs in args.epochs:
                for variant in args.variants:
                    for seed in args.seeds:
                        done = variant_run(task, variant, epochs, seed, args)
                        print(
                            f"{task} {variant} {epochs} ep seed {seed}: "
                            f"{done['train_seconds']:.0f} s",
                            flush=True,
                        )
    rows = rows_of(args.tasks, args)
    for r in rows:
        print(line(r))
    if args.markdown:
        Path(args.markdown).write_text(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0
