"""What a Ray Tune trial costs before its work starts, split into its parts (issue 9).

A stage of the pipeline is one ``Tuner.fit`` with one trial per dataset and seed, run by
``nas.pipeline.ray_layer.run_stage`` with ``reuse_actors=True``. Measured here, on a private
local Ray, with the same settings:

- ``fit_s``: one ``Tuner.fit`` of trials that do nothing (Tune's own cost per stage);
- ``imports_s``: what a fresh trial worker spends importing torch and timm, then the pipeline
  (the stage modules of ``nas.pipeline``, which bring MLflow) — paid once per worker, not per
  trial, since a finished trial's worker runs the next trial of the same stage;
- the same for ``trials`` trials on as many workers as the CPUs allow, to show the reuse.

Run: python -m benchmarks ray-trial-cost [--trials 4] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from ray import tune

from benchmarks.common import machine
from nas.pipeline.ray_layer import start_ray


def nothing(config: dict) -> None:
    tune.report({"finished": 1})


def imports(config: dict) -> None:
    start = time.perf_counter()
    import timm  # noqa: F401
    import torch  # noqa: F401

    middle = time.perf_counter()
    from nas.pipeline import hparams, retrain, subnet_search, supernet  # noqa: F401

    tune.report(
        {
            "finished": 1,
            "torch_timm_s": middle - start,
            "pipeline_s": time.perf_counter() - middle,
        }
    )


def fit(fn, trials: int, storage: str) -> tuple[float, list[dict]]:
    tuner = tune.Tuner(
        tune.with_resources(fn, {"cpu": 1}),
        param_space={"i": tune.grid_search(list(range(trials)))},
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(
            name=f"{fn.__name__}-{time.time_ns()}", storage_path=storage, verbose=0
        ),
    )
    start = time.perf_counter()
    results = tuner.fit()
    took = time.perf_counter() - start
    keys = ("torch_timm_s", "pipeline_s")
    return took, [{k: r.metrics[k] for k in keys if k in r.metrics} for r in results]


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the results here")


def run(args: argparse.Namespace) -> int:
    storage = tempfile.mkdtemp(prefix="ray-trial-cost-")
    start = time.perf_counter()
    start_ray(None)
    ray_init_s = time.perf_counter() - start
    fit(nothing, 1, storage)  # warm-up: the instance's first trial starts its worker pool
    one = [fit(nothing, 1, storage)[0] for _ in range(args.repeats)]
    many = [fit(nothing, args.trials, storage)[0] for _ in range(args.repeats)]
    # Every fit starts new workers (Tune stops its actors at the end of a fit), so every fit
    # pays the imports again; a worker that runs a second trial does not.
    cold = [fit(imports, 1, storage) for _ in range(args.repeats)]
    cold_many = [fit(imports, args.trials, storage) for _ in range(args.repeats)]
    per_worker = [m for _, ms in cold for m in ms]
    fresh = [m for _, ms in cold_many for m in ms if m["torch_timm_s"] > 0.5]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(torch.device("cpu")),
        "cpus": os.cpu_count(),
        "ray_init_s": ray_init_s,
        "fit_s": {
            "1_trial": statistics.median(one),
            f"{args.trials}_trials": statistics.median(many),
        },
        "imports_s_per_new_worker": {
            "torch_timm": statistics.median(m["torch_timm_s"] for m in per_worker),
            "pipeline": statistics.median(m["pipeline_s"] for m in per_worker),
        },
        "fit_with_imports_s": {
            "1_trial": statistics.median(t for t, _ in cold),
            f"{args.trials}_trials": statistics.median(t for t, _ in cold_many),
        },
        f"new_workers_of_{args.trials}_trials": len(fresh) / args.repeats,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    import ray

    ray.shutdown()
    return 0
