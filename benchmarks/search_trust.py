"""Is the search worth its cost? Issue 37's benchmark: the searched (and verified) winner
against what a user picks without a search, with controls that take subnet size out.

Three pipeline runs make the numbers, all with the same tasks, budgets and recipes:

1. the benchmark spec itself (``experiments/benchmark_mini_vtab.yaml``: evolution, then
   verification of its 5 best and the anchors, its winner swept and retrained; the single
   modules as baselines with their own sweeps);
2. its random-search twin (``specs`` writes it): the same spec with random search over as many
   candidates and the same verification, on the same supernets and sweeps (``seed`` copies
   them from run 1 before it starts, so that only the search differs);
3. fresh random in-budget subnets, 5 per (task, seed), each swept and retrained as a baseline
   is (``specs`` writes one spec per task and seed).

``controls`` then reads the three runs' folders and the committed ground truth (30 in-budget
subnets per task trained alone over three seeds: ``benchmarks/ground_truth.py``) and writes
``benchmarks/results/search_trust_cpu.json`` and a markdown table::

    python -m benchmarks trust specs --spec experiments/benchmark_mini_vtab.yaml --out W
    nas run experiments/benchmark_mini_vtab.yaml --output W/run
    python -m benchmarks trust seed --from W/run --to W/random-search
    nas run W/random_search.yaml                 # and each W/random_subnets/*.yaml
    python -m benchmarks trust controls --run W/run --random-search W/random-search \\
        --random-subnets W/random_subnets --pgn-run W/pgn --json OUT.json --markdown OUT.md

Nothing here chooses anything on test: the single module "chosen on val" is the one whose own
sweep scored best on val; the best single on test is reported beside it as an oracle only.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

from benchmarks.ground_truth import cache_of
from benchmarks.recipes import ground_truth_subnets, recipe_key
from benchmarks.stats import paired
from nas.search.anchors import anchors
from nas.search.evolution import Evolution
from nas.space.cost import subnet_params
from nas.space.subnet import Subnet
from nas.spec.experiment import ExperimentSpec, load_spec

#: Fresh random in-budget subnets per (task, seed).
RANDOM_SUBNETS = 5
GT_SUBNETS = 30


# -- the runs' specs ---------------------------------------------------------------------------


def random_subnets(spec: ExperimentSpec, task: str, seed: int, n: int) -> list[Subnet]:
    """``n`` distinct in-budget subnets drawn as the search draws random candidates (NOAH's
    per-layer sampling, rejected outside the budget), fresh for each task and seed."""
    rng = random.Random(f"trust-{task}-{seed}")
    out: list[Subnet] = []
    while len(out) < n:
        s = spec.space.sample(rng)
        if spec.space.admits(s) and s not in out:
            out.append(s)
    return out


def write_specs(args: argparse.Namespace) -> int:
    doc = yaml.safe_load(Path(args.spec).read_text())
    spec = load_spec(args.spec, output=args.out / "run", check_data=False)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    space = Path(str(doc["space"]))
    if space.suffix in (".yaml", ".yml") and not space.is_absolute():  # a file beside the spec
        doc["space"] = str((Path(args.spec).resolve().parent / space).resolve())
    opts = spec.search.options
    planned = Evolution(spec.space, **opts).planned if spec.search.algorithm == "evolution" else 0
    twin = json.loads(json.dumps(doc))
    twin["name"] = f"{doc['name']}-random-search"
    twin["output"] = str(out / "random-search")
    twin["stages"]["search"] = {
        "algorithm": "random",
        "cost": spec.search.cost,
        "options": {"num_candidates": planned, "batch_size": opts.get("population", 20)},
    }
    (out / "random_search.yaml").write_text(yaml.safe_dump(twin, sort_keys=False))
    folder = out / "random_subnets"
    folder.mkdir(exist_ok=True)
    for ds in spec.datasets:
        for seed in spec.seeds:
            one = json.loads(json.dumps(doc))
            one["name"] = f"{doc['name']}-random-{ds.key}-seed{seed}"
            one["datasets"] = [d for d in doc["datasets"] if d["name"] == ds.name]
            one["seeds"] = [seed]
            one["output"] = str(out / "random_subnets" / f"{ds.key}-seed{seed}")
            stages = one["stages"]
            stages["search"] = {"enabled": False}
            stages.pop("verify", None)  # nothing searched: nothing to verify
            for key in ("module_lrs", "sweep_searched"):
                stages.get("hparams", {}).pop(key, None)
            stages["retrain"]["baselines"] = {
                f"r{i}": s.to_data()
                for i, s in enumerate(random_subnets(spec, ds.key, seed, args.count), 1)
            }
            (folder / f"{ds.key}-seed{seed}.yaml").write_text(yaml.safe_dump(one, sort_keys=False))
    print(f"wrote {out / 'random_search.yaml'} and {len(list(folder.glob('*.yaml')))} specs in "
          f"{folder}")  # fmt: skip
    return 0


def seed_twin(args: argparse.Namespace) -> int:
    """Copy what the random-search twin shares with the benchmark run: the supernets and the
    supernet's and baselines' sweeps (not the searched subnets' own sweeps)."""
    src, dst = Path(args.source), Path(args.to)
    if (dst / "provenance.json").is_file():
        raise SystemExit(f"{dst} has started already: seed it before its first run")
    shutil.copytree(src / "supernet", dst / "supernet", dirs_exist_ok=True)
    for sweep in (src / "hparams").glob("*/*"):
        if sweep.name == "supernet" or sweep.name.startswith("baseline-"):
            shutil.copytree(sweep, dst / "hparams" / sweep.parent.name / sweep.name,
                            dirs_exist_ok=True)  # fmt: skip
    for state in dst.glob("supernet/*/state.pt"):
        state.unlink()  # the finished supernets' weights are in supernet.safetensors
    print(f"seeded {dst} from {src}")
    return 0


def stage_seconds(timings: list[dict[str, Any]]) -> dict[str, float]:
    """Each stage's wall time over every invocation of `nas run` (a stopped and continued
    run has several; a stopped attempt is ``{"seconds": s, "ended": "stopped"}``)."""
    out: dict[str, float] = {}
    for entry in timings:
        for stage, value in entry["stages"].items():
            seconds = value["seconds"] if isinstance(value, dict) else value
            out[stage] = round(out.get(stage, 0.0) + float(seconds), 2)
    return out


# -- the controls --------------------------------------------------------------------------------


def rows_of(run: Path) -> list[dict[str, Any]]:
    return json.loads((run / "results.json").read_text())["rows"]


def test_of(rows: list[dict], dataset: str, seed: int, label: str) -> float | None:
    for r in rows:
        if r["dataset"] == dataset and r["seed"] == seed and r["label"] == label:
            return float(r["test_acc"])
    return None


def single_baselines(spec: ExperimentSpec) -> dict[str, Subnet]:
    return {n: s for n, s in spec.retrain.baselines.items() if len(s) == 1}


def ground_truth(spec: ExperimentSpec, task: str) -> dict[Subnet, dict[int, float]]:
    cache = cache_of(task)
    recipe = recipe_key()
    out = {}
    for s in ground_truth_subnets(spec.space, GT_SUBNETS):
        accs = {seed: cache.get(s, recipe, seed) for seed in (0, 1, 2)}
        if all(a is not None for a in accs.values()):
            out[s] = accs
    return out


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mx, my = statistics.mean(xs), statistics.mean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return slope, my - slope * mx


def row(spec: ExperimentSpec, run: Path, args, dataset: str, seed: int) -> dict[str, Any]:
    g = spec.space.geometry
    main = rows_of(run)
    searched = next(r for r in main if r["dataset"] == dataset and r["seed"] == seed
                    and r["role"] == "searched")  # fmt: skip
    singles = single_baselines(spec)
    swept = {n: json.loads((run / "hparams" / dataset / f"baseline-{n}" / "done.json").read_text())
             for n in singles}  # fmt: skip
    chosen = max(singles, key=lambda n: (swept[n]["val_acc"], n))
    tests = {n: test_of(main, dataset, seed, f"baseline-{n}") for n in singles}
    out: dict[str, Any] = {
        "task": dataset,
        "seed": seed,
        "searched": searched["subnet_str"],
        "searched_params": searched["params"],
        "searched_test": searched["test_acc"],
        "val_chosen_single": chosen,
        "val_chosen_single_test": tests[chosen],
        "best_single_on_test": max(tests, key=lambda n: tests[n] or 0.0),
        "best_single_on_test_acc": max(v for v in tests.values() if v is not None),
    }
    verify = run / "verify" / f"{dataset}-seed{seed}" / "done.json"
    if verify.is_file():
        done = json.loads(verify.read_text())
        out["verify_seconds"] = done["seconds"]
        out["verified_winner_origin"] = done["top"][0]["origin"]
    if args.random_search:
        rs = rows_of(Path(args.random_search))
        out["random_search_test"] = next(
            r["test_acc"] for r in rs if r["dataset"] == dataset and r["seed"] == seed
            and r["role"] == "searched")  # fmt: skip
    if args.random_subnets:
        rr = rows_of(Path(args.random_subnets) / f"{dataset}-seed{seed}")
        out["random_subnet_tests"] = [
            r["test_acc"] for r in rr if r["label"].startswith("baseline-r")
        ]
    truth = ground_truth(spec, dataset)
    if len(truth) == GT_SUBNETS:
        subnets = list(truth)
        accs = [truth[s][seed] for s in subnets]
        sizes = [subnet_params(s, g) for s in subnets]
        out["gt_mean_test"] = statistics.mean(accs)
        out["largest_in_budget_test"] = accs[max(range(len(sizes)), key=lambda i: sizes[i])]
        # residual above the task's accuracy-on-size fit (all seeds' ground truth)
        xs = [float(sizes[i]) for i in range(len(subnets)) for _ in (0, 1, 2)]
        ys = [truth[s][k] for s in subnets for k in (0, 1, 2)]
        slope, icept = fit_line(xs, ys)
        out["size_residual"] = 100 * (searched["test_acc"] - (slope * searched["params"] + icept))
        # the cross-validated oracle: best of the 30 on the other two seeds, scored on this one
        others = [k for k in (0, 1, 2) if k != seed]
        oracle = max(subnets, key=lambda s: statistics.mean(truth[s][k] for k in others))
        out["cv_oracle"] = str(oracle)
        out["regret_vs_cv_oracle"] = 100 * (truth[oracle][seed] - searched["test_acc"])
    return out


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def diff(key):
        pairs = [r for r in rows if r.get(key) is not None]
        if not pairs:
            return None
        return paired([100 * (r["searched_test"] - r[key]) for r in pairs])

    out = {
        "searched_minus_val_chosen_single": diff("val_chosen_single_test"),
        "searched_minus_random_search": diff("random_search_test"),
        "searched_minus_gt_mean": diff("gt_mean_test"),
        "searched_minus_largest_in_budget": diff("largest_in_budget_test"),
    }
    if all("random_subnet_tests" in r for r in rows):
        out["searched_minus_random_subnets"] = paired(
            [100 * (r["searched_test"] - statistics.mean(r["random_subnet_tests"])) for r in rows]
        )
    for key in ("size_residual", "regret_vs_cv_oracle"):
        values = [r[key] for r in rows if key in r]
        if values:
            out[f"mean_{key}"] = paired(values)
    return out


def pgn_alone_found_fraction(spec_path: str, seeds: int = 50) -> float:
    """Item 1's check on the PGN benchmark's space and search settings: the share of search
    seeds whose best is PGN alone, under a fitness peaked there (minus the distance to it)."""
    spec = load_spec(spec_path, output="/tmp/unused", check_data=False)
    target = next(s for s in spec.retrain.baselines.values() if list(s) == ["pgn"])

    def fitness(s: Subnet) -> float:
        return -sum(s[k] != target[k] for k in spec.space.modules)

    found = 0
    for seed in range(seeds):
        algo = Evolution(spec.space, seed=seed, **spec.search.options,
                         named_anchors=tuple(spec.retrain.baselines.values()))  # fmt: skip
        algo.run(lambda batch: [fitness(s) for s in batch])
        found += algo.best(1)[0].subnet == target
    assert target in anchors(spec.space, spec.retrain.baselines.values())
    return found / seeds


def noah_pgn_minus_pgn(pgn_run: Path) -> dict[str, Any]:
    rows = rows_of(pgn_run)
    by = {}
    for r in rows:
        if r["role"] in ("searched", "baseline") and r["label"] in ("rank1", "baseline-pgn"):
            by.setdefault(r["label"], {}).setdefault(r["dataset"], []).append(r["test_acc"])
    flat = {k: statistics.mean(statistics.mean(v) for v in d.values()) for k, d in by.items()}
    diffs = [100 * (a["test_acc"] - b["test_acc"]) for a in rows for b in rows
             if a["label"] == "rank1" and b["label"] == "baseline-pgn"
             and (a["dataset"], a["seed"]) == (b["dataset"], b["seed"])]  # fmt: skip
    diverged = [f"{r['dataset']} seed {r['seed']} {r['label']}" for r in rows if r.get("diverged")]
    return {
        "points": 100 * (flat["rank1"] - flat["baseline-pgn"]),
        "paired": paired(diffs),
        "diverged": diverged,
    }


def controls(args: argparse.Namespace) -> int:
    run = Path(args.run)
    spec = load_spec(run / "spec.yaml", output=run, check_data=False)
    rows = [row(spec, run, args, ds.key, seed) for ds in spec.datasets for seed in spec.seeds]
    result: dict[str, Any] = {"tasks": rows, "summary": summary(rows)}
    if args.pgn_run:
        pgn = noah_pgn_minus_pgn(Path(args.pgn_run))
        result["noah_pgn_minus_pgn_points"] = pgn["points"]
        result["noah_pgn"] = pgn
    if args.pgn_spec:
        result["pgn_alone_found_fraction"] = pgn_alone_found_fraction(args.pgn_spec)
    timings = json.loads((run / "timings.json").read_text())
    result["settings"] = {
        "run": str(run),
        "spec_hash": spec.hash(),
        "random_search": args.random_search,
        "random_subnets": args.random_subnets,
        "stage_seconds": stage_seconds(timings),
        "ground_truth_recipe": recipe_key(),
        "command": "python -m benchmarks " + " ".join(sys.argv[1:]),
    }
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table(rows, result["summary"]))
    print(json.dumps(result["summary"], indent=2))
    return 0


def table(rows: list[dict[str, Any]], summ: dict[str, Any]) -> str:
    cols = ["task", "seed", "searched_test", "val_chosen_single", "val_chosen_single_test",
            "random_search_test", "gt_mean_test", "largest_in_budget_test", "size_residual",
            "regret_vs_cv_oracle"]  # fmt: skip

    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v if v is not None else "-")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    lines += ["", "| paired difference (points) | mean | 95% interval | n |", "|---|---|---|---|"]
    for key, p in summ.items():
        if p:
            span = "-" if p["low"] is None else f"{p['low']:+.2f} to {p['high']:+.2f}"
            lines.append(f"| {key} | {p['mean']:+.2f} | {span} | {p['n']} |")
    return "\n".join(lines) + "\n"


def arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("specs", help="write the random-search twin and the random-subnet specs")
    p.add_argument("--spec", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int, default=RANDOM_SUBNETS)
    p = sub.add_parser("seed", help="copy the supernets and sweeps into the twin's folder")
    p.add_argument("--from", dest="source", required=True)
    p.add_argument("--to", required=True)
    p = sub.add_parser("controls", help="read the runs and write the JSON and table")
    p.add_argument("--run", required=True)
    p.add_argument("--random-search")
    p.add_argument("--random-subnets")
    p.add_argument("--pgn-run")
    p.add_argument("--pgn-spec")
    p.add_argument("--json", required=True)
    p.add_argument("--markdown")


def run(args: argparse.Namespace) -> int:
    return {"specs": write_specs, "seed": seed_twin, "controls": controls}[args.command](args)
