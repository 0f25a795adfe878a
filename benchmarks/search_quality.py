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

Run: python benchmarks/search_quality.py controls [--tasks digits dsprites_loc] [--json OUT.json]

Ranking fidelity against a ground truth that can resolve it (issue 20): ``fidelity`` trains
one supernet per variant (``VARIANTS``: NOAH's sampling, in-budget, size-balanced, the sandwich
rule, in-place distillation, schedule lengths) on train800 exactly as the pipeline's supernet
stage does, scores the ground-truth subnets of ``benchmarks/ground_truth.py`` with inherited
weights on val200 (what the search sees) and on the test split (the supernet's own fidelity,
free of val200's noise), and reports Kendall's tau against their seed-averaged trained-alone
test accuracy, beside the noise ceiling (tau between the ground truth's own seeds) and the
tau of ranking by size alone. Results are cached per (task, variant, epochs, seed) in
``benchmarks/results/fidelity/<task>.json``; ``fidelity --report`` prints the table.

Run: python benchmarks/search_quality.py fidelity --tasks clevr_count --variants noah balanced
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import itertools
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from scipy.stats import kendalltau

from nas.data.decode import decode_split
from nas.data.lists import read_vtab
from nas.data.mini_vtab import prepare
from nas.families.vit.model import PromptedViT
from nas.search import make_search
from nas.space.cost import subnet_params
from nas.space.search_space import SearchSpace, load_space
from nas.space.subnet import Subnet
from nas.training.evaluate import evaluate, evaluate_candidates, score_candidates
from nas.training.train import TrainConfig, train

#: Where the cached runs live (``--results`` moves them, e.g. for a smoke run).
RESULTS = Path(__file__).resolve().parent / "results"


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
    size = g.image_size
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


#: Supernet variants: the supernet stage's sampling settings (``SupernetSettings``) and epochs.
VARIANTS: dict[str, dict] = {
    "noah": {},
    "in_budget": {"in_budget": True},
    "balanced": {"sampling": "balanced", "in_budget": True},
    "balanced_all": {"sampling": "balanced"},
    "sandwich": {"sandwich": True, "in_budget": True},
    "sandwich_distill": {"sandwich": True, "in_budget": True, "distill": 0.5},
    "distill": {"in_budget": True, "distill": 0.5},
    "two_per_step": {"in_budget": True, "subnets_per_step": 2},
    "sandwich_all": {"sandwich": True},  # the whole supernet's largest and smallest
    "sandwich_all_k2": {"sandwich": True, "subnets_per_step": 2},  # and two random draws
    "sandwich_distill_all": {"sandwich": True, "distill": 0.5},
}


def train_supernet(space: SearchSpace, data, variant: str, epochs: int, seed: int, lr: float):
    """A supernet trained on train800 as the pipeline's supernet stage trains it (batch 64,
    2 warm-up epochs, wd 1e-4) with ``variant``'s sampling settings."""
    from nas.spec.stages import SupernetSettings
    from nas.training.sampling import supernet_steps

    settings = {"sampling": "uniform", "in_budget": False, "subnets_per_step": 1}
    settings |= {"sandwich": False, "distill": 0.0} | VARIANTS[variant]
    steps = supernet_steps(space, SupernetSettings(**settings))
    mean, std = space.backbone.normalisation()
    classes = data["train"].num_classes
    cfg = TrainConfig(
        epochs=epochs, lr=lr, weight_decay=1e-4, warmup_epochs=min(2, epochs), seed=seed
    )
    started = time.time()
    torch.manual_seed(seed)
    supernet = PromptedViT.supernet(space, classes, space.backbone.create(classes))
    train(supernet, data["train"], cfg, mean=mean, std=std, sample_subnet=steps)
    return supernet, settings, time.time() - started


#: The ridge penalty of a refitted head, relative to the mean diagonal of the features' Gram
#: matrix (fixed before any measurement; not tuned).
REFIT_RIDGE = 1e-2


@torch.no_grad()
def head_inputs(model: PromptedViT, subnet: Subnet, batches) -> tuple[torch.Tensor, torch.Tensor]:
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
    model: PromptedViT, subnets: list[Subnet], fit, scored, *, mean, std
) -> list[float]:
    """Each subnet scored with a head of its own instead of the supernet's shared one: a ridge
    classifier (one-hot targets, closed form) fitted on ``fit``'s features under the subnet,
    its accuracy on ``scored``. The shared head is a compromise over every subnet the supernet
    trained; a refitted one asks only how good the subnet's features are."""
    from nas.data.loader import TensorLoader

    fit_batches = list(TensorLoader(fit, 256, mean, std))
    scored_batches = list(TensorLoader(scored, 256, mean, std))
    classes = fit.num_classes
    out = []
    for subnet in subnets:
        x, y = head_inputs(model, subnet, fit_batches)
        xs, ys = head_inputs(model, subnet, scored_batches)
        ones = torch.ones(len(x), 1, dtype=x.dtype)
        xa = torch.cat([x, ones], 1)
        gram = xa.T @ xa
        ridge = REFIT_RIDGE * gram.diagonal().mean()
        targets = torch.nn.functional.one_hot(y, classes).double()
        w = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=x.dtype), xa.T @ targets)
        logits = torch.cat([xs, torch.ones(len(xs), 1, dtype=x.dtype)], 1) @ w
        out.append((logits.argmax(1) == ys).double().mean().item())
    return out


def cached_run(kind: str, task: str, key: str, compute) -> dict:
    """``compute()``'s result, cached under results/<kind>/<task>.json by ``key``."""
    path = RESULTS / kind / f"{task}.json"
    cache = json.loads(path.read_text()) if path.is_file() else {"task": task, "runs": {}}
    if key in cache["runs"]:
        return cache["runs"][key]
    run = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:  # other processes may write it too
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache = json.loads(path.read_text()) if path.is_file() else cache
        cache["runs"][key] = run
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)
    return run


def fidelity_variant(task: str, variant: str, epochs: int, seed: int, args) -> dict:
    """One supernet of ``variant`` trained on the task; its inherited accuracies of the
    ground-truth subnets on val200 and test, cached."""
    import ground_truth as gt

    def compute() -> dict:
        space = gt.space_with_budget()
        subnets = gt.ground_truth_subnets(space, args.subnets)
        data = gt.task_data(task, Path(args.data), space)
        supernet, settings, seconds = train_supernet(space, data, variant, epochs, seed, args.lr)
        mean, std = space.backbone.normalisation()
        val = score_candidates(supernet, subnets, data["val"], mean=mean, std=std)
        test = score_candidates(supernet, subnets, data["test"], mean=mean, std=std)
        return {
            "variant": variant,
            "settings": settings,
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
            **(
                {
                    "refit_ridge": REFIT_RIDGE,
                    "refit_val": refit_scores(
                        supernet, subnets, data["train"], data["val"], mean=mean, std=std
                    ),
                    "refit_test": refit_scores(
                        supernet, subnets, data["train"], data["test"], mean=mean, std=std
                    ),
                }
                if args.refit
                else {}
            ),
        }

    key = f"{variant}|{epochs}|{seed}|{args.lr:g}" + ("|refit" if args.refit else "")
    return cached_run("fidelity", task, key, compute)


def ground_truth_of(task: str, subnets: list[Subnet]) -> dict[Subnet, list[float]]:
    """The cached trained-alone accuracies of ``subnets`` over the seeds that every one of
    them has (seeds 0, 1, 2 in that order); empty while some subnet has none."""
    import ground_truth as gt

    cache, recipe = gt.Cache(task, RESULTS / "ground_truth"), gt.recipe_key()
    truth = {s: [cache.get(s, recipe, seed) for seed in (0, 1, 2)] for s in subnets}
    seeds = min(next((i for i, a in enumerate(v) if a is None), len(v)) for v in truth.values())
    return {s: v[:seeds] for s, v in truth.items()} if seeds else {}


def fidelity_rows(tasks: list[str], args) -> list[dict]:
    """Per task and cached supernet run: tau against the seed-averaged ground truth."""
    import ground_truth as gt

    space = gt.space_with_budget()
    subnets = gt.ground_truth_subnets(space, args.subnets)
    rows = []
    for task in tasks:
        truth = ground_truth_of(task, subnets)
        if not truth:
            continue
        seeds = len(next(iter(truth.values())))
        means = gt.seed_mean(truth)
        sizes = [subnet_params(s, space.geometry) for s in subnets]
        path = RESULTS / "fidelity" / f"{task}.json"
        runs = json.loads(path.read_text())["runs"] if path.is_file() else {}
        base = {
            "task": task,
            "truth_seeds": seeds,
            "tau_noise_ceiling": gt.noise_ceiling(truth) if seeds > 1 else None,
            "truth_range": [min(means), max(means)],
        }
        rows.append({**base, "variant": "by size", "tau_val": kendalltau(sizes, means)[0]})
        for run in runs.values():
            if run["subnets"] != [s.to_data() for s in subnets]:
                continue  # measured on another list of subnets (--subnets)
            if "refit_val" in run:  # the same supernet scored with a refitted head per subnet
                rows.append(
                    {
                        **base,
                        "variant": f"{run['variant']} + head refit",
                        "epochs": run["epochs"],
                        "seed": run["seed"],
                        "lr": run["lr"],
                        "train_seconds": run["train_seconds"],
                        "tau_val": kendalltau(run["refit_val"], means)[0],
                        "tau_test": kendalltau(run["refit_test"], means)[0],
                        "tau_val_shared_head": kendalltau(run["inherited_val"], means)[0],
                    }
                )
                plain = f"{run['variant']}|{run['epochs']}|{run['seed']}|{run['lr']:g}"
                if plain in runs:  # its shared-head scores are that run's row already
                    continue
            rows.append(
                {
                    **base,
                    "variant": run["variant"],
                    "epochs": run["epochs"],
                    "seed": run["seed"],
                    "lr": run["lr"],
                    "train_seconds": run["train_seconds"],
                    "tau_val": kendalltau(run["inherited_val"], means)[0],
                    "tau_test": kendalltau(run["inherited_test"], means)[0],
                    # ranked by lower inherited loss instead of higher accuracy
                    **(
                        {"tau_val_loss": -kendalltau(run["inherited_val_loss"], means)[0]}
                        if "inherited_val_loss" in run
                        else {}
                    ),
                }
            )
    return rows


def fidelity_main(argv: list[str]) -> int:
    global RESULTS
    parser = argparse.ArgumentParser(prog="search_quality.py fidelity")
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
    args = parser.parse_args(argv)
    RESULTS = args.results
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.report:
        Path(args.data).mkdir(parents=True, exist_ok=True)
        for task in args.tasks:
            for epochs in args.epochs:
                for variant in args.variants:
                    for seed in args.seeds:
                        run = fidelity_variant(task, variant, epochs, seed, args)
                        print(
                            f"{task} {variant} {epochs} ep seed {seed}: "
                            f"{run['train_seconds']:.0f} s",
                            flush=True,
                        )
    rows = fidelity_rows(args.tasks, args)
    for r in rows:
        ceiling = r["tau_noise_ceiling"]
        tail = (
            f"(ceiling {ceiling:.2f}, {r['truth_seeds']} seeds)"
            if ceiling is not None
            else "(1 seed of ground truth)"
        )
        test = f"test {r['tau_test']:+.2f} " if "tau_test" in r else " " * 11
        if "tau_val_loss" in r:
            test += f"val loss {r['tau_val_loss']:+.2f} "
        print(
            f"{r['task']:<13} {r['variant']:<17} {r.get('epochs', ''):>4} "
            f"s{r.get('seed', '')} tau val {r['tau_val']:+.2f} {test}{tail}"
        )
    if args.markdown:
        Path(args.markdown).write_text(fidelity_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def fidelity_table(rows: list[dict]) -> str:
    """Markdown: per variant and epochs, tau on val200 (test in brackets) per task, averaged
    over supernet seeds, and the mean over tasks; the noise ceiling and size-only rows."""
    tasks = sorted({r["task"] for r in rows})
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        key = (r["variant"], r.get("epochs", 0))
        groups.setdefault(key, {}).setdefault(r["task"], []).append(r)
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


#: The mini-VTAB benchmark's search (experiments/benchmark_mini_vtab.yaml): 100 candidates.
EVOLUTION = {"generations": 5, "population": 20, "top_k": 5, "mutations": 8, "crossovers": 8}
#: The learning rates each single module's sweep tries (the benchmark's grid), 10 epochs.
SWEEP_LRS, SWEEP_EPOCHS = (1e-3, 5e-3, 2e-2), 10


def largest_single(space: SearchSpace, kind: str) -> Subnet:
    """One module kind on every layer at the largest dim that keeps it in budget."""
    ms = space.modules[kind]
    for dim in sorted((d for d in ms.dims if d), reverse=True):
        subnet = Subnet.from_data({kind: {"depth": max(ms.depths), "dims": dim}})
        if space.admits(subnet):
            return subnet
    raise ValueError(f"no uniform {kind} subnet fits the budget")


class NotMeasured(Exception):
    """``value --report`` met a run or a retraining that the cache does not hold yet."""


def value_run(task: str, seed: int, args) -> dict:
    """The search's winner against its controls on one task and seed, every one retrained
    with the ground truth's recipe (shared cache) and tested once. With ``args.report`` only
    the cache is read (``NotMeasured`` when something is missing)."""
    import ground_truth as gt

    space = gt.space_with_budget()
    gt_subnets = gt.ground_truth_subnets(space, args.subnets)
    data = None

    def retrained(subnet: Subnet, lr: float = gt.RECIPE.lr) -> float:
        nonlocal data
        cache = gt.Cache(task, RESULTS / "ground_truth")
        recipe = gt.recipe_key(dataclasses.replace(gt.RECIPE, lr=lr))
        acc = cache.get(subnet, recipe, seed)
        if acc is None and args.report:
            raise NotMeasured(f"{task} seed {seed}: {subnet} at lr {lr:g} not retrained")
        if acc is None:
            data = data or gt.task_data(task, Path(args.data), space)
            started = time.time()
            acc = gt.train_alone(space, subnet, data, seed, lr=lr)
            cache.put(subnet, recipe, seed, acc, time.time() - started, lr=lr)
        return acc

    def compute() -> dict:
        nonlocal data
        if args.report:
            raise NotMeasured(f"{task} seed {seed}: no {args.variant} search yet")
        data = data or gt.task_data(task, Path(args.data), space)
        mean, std = space.backbone.normalisation()
        supernet, settings, seconds = train_supernet(
            space, data, args.variant, args.epochs, seed, args.lr
        )

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
            "settings": settings,
            "supernet_seconds": round(seconds, 1),
            "candidates": n,
            "winners": {k: v.to_data() for k, v in winners.items()},
            "singles": singles,
            # the ground-truth subnets' inherited val200 accuracies: tau is computed against
            # whatever ground truth the cache holds when the report is made
            "inherited_val_gt": score(gt_subnets),
        }

    def own_lr(subnet: Subnet) -> float:
        """``subnet``'s own rate: the single modules' sweep (SWEEP_LRS, 10 epochs on train800,
        chosen on val200, ties to the smaller rate), each point cached."""
        nonlocal data

        def point(lr: float) -> float:
            def compute_point() -> dict:
                nonlocal data
                if args.report:
                    raise NotMeasured(f"{task} seed {seed}: {subnet} not swept at lr {lr:g}")
                data = data or gt.task_data(task, Path(args.data), space)
                return {"val": sweep_point(space, subnet, data, seed, lr)}

            return cached_run("lr_sweep", task, sweep_key(subnet, seed, lr), compute_point)["val"]

        val = {lr: point(lr) for lr in SWEEP_LRS}
        return max(val, key=lambda lr: (val[lr], -lr))

    truth = ground_truth_of(task, gt_subnets)
    key = f"{args.variant}|{args.epochs}|{seed}|{args.lr:g}"
    run = cached_run("search_value", task, key, compute)
    tests = {k: retrained(Subnet.from_data(v)) for k, v in run["winners"].items()}
    own: dict[str, dict] = {}  # a control retrained at its own swept rate, where measured
    for role in OWN_LR_ROLES:
        if role not in args.own_lr and not args.report:
            continue
        try:
            subnet = Subnet.from_data(run["winners"][role])
            lr = own_lr(subnet)
            own[role] = {"lr": lr, "test": retrained(subnet, lr)}
        except NotMeasured:
            continue
    single_tests = {
        kind: retrained(Subnet.from_data(v["subnet"]), v["lr"])
        for kind, v in run["singles"].items()
    }
    best_single = max(run["singles"], key=lambda k: max(run["singles"][k]["val"].values()))
    inherited = run.get("inherited_val_gt")
    tau = kendalltau(inherited, gt.seed_mean(truth))[0] if truth and inherited else None
    return {
        "task": task,
        "seed": seed,
        "kendall_tau": run.get("kendall_tau", tau) if tau is None else tau,
        "tau_noise_ceiling": gt.noise_ceiling(truth) if truth else None,
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


#: The controls that ``value --own-lr`` also retrains at their own swept rate.
OWN_LR_ROLES = ("searched", "random_subnet", "random_search", "largest_in_budget")


def sweep_key(subnet: Subnet, seed: int, lr: float) -> str:
    blob = json.dumps(subnet.to_data(), sort_keys=True, separators=(",", ":"))
    return f"{blob}|{seed}|{lr:g}|{SWEEP_EPOCHS}"


def sweep_point(space: SearchSpace, subnet: Subnet, data, seed: int, lr: float) -> float:
    """Validation accuracy of ``subnet`` trained alone on train800 at ``lr`` (the sweep)."""
    mean, std = space.backbone.normalisation()
    classes = data["train"].num_classes
    torch.manual_seed(seed)
    model = PromptedViT.for_subnet(
        space.backbone.create(classes), subnet, space.options(), space.backbone
    )
    cfg = TrainConfig(epochs=SWEEP_EPOCHS, lr=lr, weight_decay=1e-4, warmup_epochs=0, seed=seed)
    train(model, data["train"], cfg, mean=mean, std=std)
    return evaluate(model, data["val"], mean=mean, std=std)


def value_main(argv: list[str]) -> int:
    global RESULTS
    parser = argparse.ArgumentParser(prog="search_quality.py value")
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
    args = parser.parse_args(argv)
    RESULTS = args.results
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.threads:
        torch.set_num_threads(args.threads)
    Path(args.data).mkdir(parents=True, exist_ok=True)
    # read first: a wrong store fails before the (long) runs, not after them
    pgn = noah_pgn_versus_pgn(args.pgn_store) if args.pgn_store else None
    rows = []
    for task in args.tasks:
        for seed in args.seeds:
            try:
                row = value_run(task, seed, args)
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
    summary = value_summary(rows)
    for line in summary["lines"]:
        print(line)
    if args.markdown:
        Path(args.markdown).write_text(value_table(rows, summary))
    if pgn:
        print(pgn["line"])
    if args.json:
        doc = {
            "tasks": rows,
            "summary": {k: v for k, v in summary.items() if k != "lines"},
            # the PGN budget's run (nas run, read from its MLflow store): None if not given
            "noah_pgn_minus_pgn_points": pgn["minus_points"] if pgn else None,
            "settings": {
                "variant": args.variant,
                "supernet_epochs": args.epochs,
                "supernet_lr": args.lr,
                "evolution": EVOLUTION,
                "retrain": gt_recipe(),
                "single_module_sweep": {"lrs": SWEEP_LRS, "epochs": SWEEP_EPOCHS},
                # the same sweep gives the *_own_lr_test columns their rates
                "own_lr_roles": [r for r in OWN_LR_ROLES if any(f"{r}_own_lr" in x for x in rows)],
                "date": time.strftime("%Y-%m-%d"),
                # the runs' own threads (--report reads caches: pass the runs' --threads)
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                f"{torch.get_num_threads()} torch thread(s) per process",
                "pairs_measured": len(rows),
                "noah_pgn": {k: v for k, v in pgn.items() if k != "line"} if pgn else None,
            },
        }
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


#: The controls the searched winner is compared with, as named in the issue's JSON.
CONTROLS = ("random_subnet", "random_search", "largest_in_budget", "best_single_module")


def noah_pgn_versus_pgn(uri: str) -> dict:
    """NOAH+PGN's searched winner against the ``pgn`` baseline (PGN alone), both retrained and
    tested once in one run of ``experiments/benchmark_mini_vtab_pgn.yaml``, read back from its
    MLflow store: the flat-mean difference over tasks (seed means) in points, and the paired
    (task, seed) differences with their 95% interval."""
    from nas.core.errors import NasError
    from nas.pipeline.reports import method_of, results_from_mlflow

    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise SystemExit(f"--pgn-store {uri}: no such MLflow database")
    try:
        rows = results_from_mlflow(uri)["rows"]
    except NasError as exc:
        raise SystemExit(f"--pgn-store {exc}") from None
    acc: dict[tuple[str, int], dict[str, float]] = {}
    for r in rows:
        method = method_of(r)
        if method in ("searched", "pgn"):
            acc.setdefault((r["dataset"], r["seed"]), {})[method] = r["test_acc"]
    both = {k: v for k, v in acc.items() if len(v) == 2}
    if not both:
        raise SystemExit(f"{uri}: no (task, seed) with both the searched winner and PGN alone")
    tasks = sorted({task for task, _ in both})
    per_task = {
        t: {
            m: statistics.mean(v[m] for (tt, _), v in both.items() if tt == t)
            for m in ("searched", "pgn")
        }
        for t in tasks
    }
    flat = {m: statistics.mean(v[m] for v in per_task.values()) for m in ("searched", "pgn")}
    diffs = paired([100 * (v["searched"] - v["pgn"]) for v in both.values()])
    minus = 100 * (flat["searched"] - flat["pgn"])
    return {
        "minus_points": minus,
        "paired": diffs,
        "flat_mean": flat,
        "per_task": per_task,
        "pairs": len(both),
        "store": uri,
        "line": f"NOAH+PGN - PGN alone: {minus:+.2f} points flat over {len(tasks)} tasks "
        f"({len(both)} pairs, 95% interval {diffs['low']:+.2f} to {diffs['high']:+.2f})",
    }


def paired(diffs: list[float]) -> dict:
    """Mean of paired differences (in points) with a two-sided 95% t interval."""
    from scipy.stats import t

    n = len(diffs)
    mean = statistics.mean(diffs)
    half = t.ppf(0.975, n - 1) * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else math.inf
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def value_summary(rows: list[dict]) -> dict:
    """Searched minus each control, pooled over every (task, seed) pair (paired t interval),
    and the flat means over tasks of the seed-averaged accuracies (tasks with every seed)."""
    out: dict = {"pooled_minus": {}, "flat_mean": {}, "lines": []}
    if not rows:
        return out
    for control in CONTROLS:
        diffs = [100 * (r["searched_test"] - r[f"{control}_test"]) for r in rows]
        out["pooled_minus"][control] = paired(diffs)
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    for name in ("searched", *CONTROLS):
        per_task = [statistics.mean(r[f"{name}_test"] for r in v) for v in by_task.values()]
        out["flat_mean"][name] = statistics.mean(per_task)
    taus = [r["kendall_tau"] for r in rows if r["kendall_tau"] is not None]
    out["kendall_tau_mean"] = statistics.mean(taus) if taus else None
    out["pairs"], out["tasks"] = len(rows), sorted(by_task)
    out["lines"].append(f"{len(rows)} (task, seed) pairs over {len(by_task)} tasks")
    for control, p in out["pooled_minus"].items():
        out["lines"].append(
            f"searched - {control}: {p['mean']:+.2f} points "
            f"(95% interval {p['low']:+.2f} to {p['high']:+.2f})"
        )
    flat = ", ".join(f"{k} {100 * v:.2f}" for k, v in out["flat_mean"].items())
    out["lines"].append(f"flat means: {flat}")
    out["own_lr_minus"] = {}
    for other in OWN_LR_VERSUS:  # the searched winner at its own swept rate, where measured
        both = [r for r in rows if "searched_own_lr_test" in r and f"{other}_test" in r]
        if len(both) < 2:
            continue
        diffs = [100 * (r["searched_own_lr_test"] - r[f"{other}_test"]) for r in both]
        p = out["own_lr_minus"][other] = paired(diffs)
        p["ahead"] = sum(d > 0 for d in diffs)
        out["lines"].append(
            f"searched (own lr) - {other}: {p['mean']:+.2f} points (95% interval "
            f"{p['low']:+.2f} to {p['high']:+.2f}, {p['n']} pairs, ahead on {p['ahead']})"
        )
    return out


#: What the searched winner retrained at its own swept rate is compared with.
OWN_LR_VERSUS = (
    "best_single_module",
    "random_subnet_own_lr",
    "random_search_own_lr",
    "largest_in_budget_own_lr",
    "searched",
)


def value_table(rows: list[dict], summary: dict) -> str:
    """Markdown: one row per (task, seed), test accuracy in %, then the pooled differences."""
    head = ["task", "seed", "tau", "searched", "random subnet", "random search"]
    head += ["largest in budget", "best single module"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        tau = "—" if r["kendall_tau"] is None else f"{r['kendall_tau']:+.2f}"
        cells = [r["task"], str(r["seed"]), tau, f"{100 * r['searched_test']:.1f}"]
        cells += [f"{100 * r[f'{c}_test']:.1f}" for c in CONTROLS[:3]]
        cells.append(f"{100 * r['best_single_module_test']:.1f} ({r['best_single_module']})")
        lines.append("| " + " | ".join(cells) + " |")
    flat = summary.get("flat_mean", {})
    if flat:
        cells = ["**flat mean**", "", "", f"{100 * flat['searched']:.2f}"]
        cells += [f"{100 * flat[c]:.2f}" for c in CONTROLS]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| searched minus | mean (points) | 95% interval | pairs |")
    lines.append("|---|---|---|---|")
    for control, p in summary.get("pooled_minus", {}).items():
        lines.append(
            f"| {control.replace('_', ' ')} | {p['mean']:+.2f} | "
            f"{p['low']:+.2f} to {p['high']:+.2f} | {p['n']} |"
        )
    own = [r for r in rows if "searched_own_lr_test" in r]
    if own:
        lines += ["", "Every one at its own swept rate (rate in brackets), test accuracy in %:", ""]
        head = ["task", "seed", "searched", *(c.replace("_", " ") for c in OWN_LR_ROLES[1:])]
        lines += ["| " + " | ".join([*head, "best single module"]) + " |"]
        lines.append("|---" * (len(head) + 1) + "|")
        for r in own:
            cells = [r["task"], str(r["seed"])]
            for role in OWN_LR_ROLES:
                test = r.get(f"{role}_own_lr_test")
                cells.append("—" if test is None else f"{100 * test:.1f} ({r[f'{role}_own_lr']:g})")
            cells.append(f"{100 * r['best_single_module_test']:.1f} ({r['best_single_module']})")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines += ["| searched (own rate) minus | mean (points) | 95% interval | pairs | ahead |"]
        lines.append("|---|---|---|---|---|")
        for other, p in summary.get("own_lr_minus", {}).items():
            lines.append(
                f"| {other.replace('_', ' ').replace('own lr', '(own rate)')} | "
                f"{p['mean']:+.2f} | {p['low']:+.2f} to {p['high']:+.2f} | {p['n']} | "
                f"{p['ahead']} |"
            )
    return "\n".join(lines) + "\n"


def gt_recipe() -> dict:
    import ground_truth as gt

    return gt.RECIPE.to_dict()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "fidelity":
        return fidelity_main(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "value":
        return value_main(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "controls":
        sys.argv.pop(1)
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
