"""How fast against the limits (issue 10): each measurement is a ratio against its floor.

1. supernet overhead: a training step of the supernet with a fresh random subnet per batch,
   against the same subnets as standalone static models (``export()``), on the same batches.
   Target: at most 1.05 on a GPU, 1.10 on a CPU.
2. module cost: a training step of the largest subnet (standalone) against the frozen
   backbone's own forward + backward with no modules (gradient to the input): the floor that
   no prompt method can beat, since every one needs the backward pass through the blocks.
3. search throughput: candidates scored per minute by the search stage as the pipeline runs it
   (algorithm, candidate log, MLflow child run per candidate) against the pure forward time of
   the validation split per candidate (target: above 0.9); and the same search stage through
   a Ray Tune trial against it in this process (Ray's overhead, per stage and per candidate).

Rates are medians of ``--repeats`` timed runs after a warm-up; every ratio is taken within
one run, the two sides interleaved, because these machines are noisy.

Run: python -m benchmarks speed [--device cuda] [--json benchmarks/results/speed_cpu_DATE.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import machine, sync
from nas.data.decode import decode_split
from nas.data.lists import read_vtab
from nas.data.loader import TensorLoader
from nas.data.mini_vtab import prepare
from nas.families import build_prompted
from nas.pipeline.layout import run_layout
from nas.pipeline.subnet_search import read_candidates_log, run_search
from nas.space.search_space import load_space
from nas.spec.experiment import load_spec
from nas.training.evaluate import evaluate_candidates
from trainers.optim import build_optimizer

for key, value in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}.items():
    os.environ.setdefault(key, value)


def interleaved(fns: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each function, run in turn ``repeats`` times after a warm-up."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def step_fn(model, batches, device, subnets=None):
    """One pass of training steps over ``batches`` (a subnet per batch when given)."""
    optimizer = build_optimizer(model, 1e-3)
    amp = device.type == "cuda"
    model.train()

    def run():
        for i, (x, y) in enumerate(batches):
            if subnets is not None:
                model.set_subnet(subnets[i])
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return run


def training_steps(space, split, device, repeats: int, steps: int, batch: int) -> dict:
    mean, std = space.backbone.normalisation()
    loader = TensorLoader(split, batch, mean, std, shuffle=True, device=device, drop_last=True)
    batches = [b for _, b in zip(range(steps), loader, strict=False)]
    rng = random.Random(0)
    subnets = [space.sample(rng) for _ in batches]
    torch.manual_seed(0)
    supernet = build_prompted(space.backbone, space, split).to(device)
    standalone = []
    for s in subnets:
        supernet.set_subnet(s)
        standalone.append(supernet.export())

    standalone_runs = [step_fn(m, [b], device) for m, b in zip(standalone, batches, strict=True)]
    supernet.set_subnet(space.largest())
    largest = supernet.export()
    backbone = space.backbone.create(split.num_classes).to(device)
    backbone.requires_grad_(False)

    def floor():
        # The frozen backbone's own forward + backward: the gradient flows to the input
        # through every block, as it must for any prompt module; no parameter gets one.
        for x, _ in batches:
            x = x.detach().requires_grad_(True)
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                out = backbone(x)
            out.float().square().mean().backward()

    times = interleaved(
        {
            "supernet": step_fn(supernet, batches, device, subnets),
            "standalone": lambda: [run() for run in standalone_runs],
            "largest": step_fn(largest, batches, device),
            "floor": floor,
        },
        repeats,
        device,
    )
    images = len(batches) * batch
    return {
        "steps": len(batches),
        "batch": batch,
        "img_s": {k: images / v for k, v in times.items()},
        "supernet_over_standalone": times["supernet"] / times["standalone"],
        "largest_over_floor": times["largest"] / times["floor"],
        "largest_subnet": str(space.largest()),
    }


def search_spec(work: Path, data: Path, candidates: int, device: torch.device) -> Path:
    spec = {
        "name": "speed",
        "datasets": [{"name": "dsprites_loc", "format": "mini-vtab", "root": str(data)}],
        "backbone": "vit_fmnist",
        "space": "tiny_cpu",
        # on a GPU, as experiments/noah_vtab.yaml: 4 CPUs per trial (3 candidate loggers)
        "resources": {"cpus": 4, "gpus": 1} if device.type == "cuda" else {"cpus": 1, "gpus": 0},
        "stages": {
            "supernet": {"epochs": 1, "warmup_epochs": 0},
            "search": {
                "algorithm": "random",
                "options": {"num_candidates": candidates, "batch_size": 8},
            },
        },
    }
    path = work / "speed.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class SearchRuns:
    """The search stage of a small spec (its supernet trained once), timed again and again,
    each time in a fresh search folder and MLflow experiment: in the old ones the search's
    parent run would be found again and its candidates skipped as already logged."""

    def __init__(self, work: Path, data: Path, device: torch.device, candidates: int) -> None:
        from nas.pipeline import context, supernet
        from nas.pipeline.tasks import Task

        self.path = search_spec(work, data, candidates, device)
        self.out, self.device, self.candidates = work / "out", device, candidates
        self.spec = load_spec(self.path, output=self.out)
        context.tracker_for(self.spec)
        self.task = Task(
            spec=str(self.path),
            spec_abs=str(self.path),
            output=str(self.out),
            dataset="dsprites_loc",
            seed=0,
        )
        supernet.run_supernet(self.task)
        self.folder = run_layout(self.spec).search("dsprites_loc", 0)
        self.fresh = iter(range(1_000_000))

    def reset(self, scale: int = 1) -> None:
        from nas.pipeline import context

        shutil.rmtree(self.folder, ignore_errors=True)
        data = yaml.safe_load(self.path.read_text())
        data["stages"]["search"]["options"]["num_candidates"] = scale * self.candidates
        data["mlflow"] = {"experiment": f"speed-{next(self.fresh)}"}
        moved = str(self.path.with_name(f"speed-{next(self.fresh)}.yaml"))
        self.task = dataclasses.replace(self.task, spec=moved, spec_abs=moved)
        Path(moved).write_text(yaml.safe_dump(data))
        context.tracker_for(load_spec(moved, output=self.out))

    def timed(self, fn, scale: int = 1) -> float:
        self.reset(scale)
        sync(self.device)
        start = time.perf_counter()
        fn()
        sync(self.device)
        return time.perf_counter() - start

    def pure(self):
        """The floor: the search's candidates' forward passes over the validation split,
        nothing else (the candidates the search stage scores, read from its log)."""
        from nas.pipeline import context

        subnets = [e.subnet for e in read_candidates_log(self.folder / "candidates.jsonl")]
        val = context.load_splits(self.spec, self.spec.datasets[0], ("val",))["val"]
        model = build_prompted(self.spec.backbone, self.spec.space, val).to(self.device)
        mean, std = self.spec.backbone.normalisation()
        batch = self.spec.search.eval_batch_size

        def score():
            evaluate_candidates(model, subnets, val, mean=mean, std=std, batch_size=batch)

        return score, len(subnets)

    def in_process(self) -> None:
        run_search(self.task)

    def through_ray(self) -> None:
        from nas.pipeline.ray_layer import run_stage

        # As many CPUs as the in-process run has threads: Ray sets a trial's OMP_NUM_THREADS
        # to its CPUs, and a trial with fewer threads would be slower for that reason alone.
        run_stage(
            "search",
            run_search,
            [self.task],
            storage=self.out / "ray",
            cpus=torch.get_num_threads(),
            gpus=self.spec.gpus,
        )


def time_searches(runs: SearchRuns, repeats: int, with_ray: bool) -> tuple[dict, int]:
    """Median seconds of the pure forward passes, the search stage in process (at 1x and 4x
    the candidates), and (``with_ray``) the stage as a Ray Tune trial beside the in-process
    stage with Ray up; and the number of candidates."""
    run_search(runs.task)
    pure, n = runs.pure()
    runs.timed(pure), runs.timed(runs.in_process)  # warm-up
    times: dict[str, list[float]] = {
        "pure": [],
        "in_process": [],
        "in_process_4x": [],
        "in_process_ray_up": [],
        "ray": [],
    }
    for _ in range(repeats):  # before Ray starts: its idle daemons take CPU time too
        times["pure"].append(runs.timed(pure))
        times["in_process"].append(runs.timed(runs.in_process))
        times["in_process_4x"].append(runs.timed(runs.in_process, 4))
    if with_ray:
        from nas.pipeline.ray_layer import start_ray

        started = start_ray(None)
        try:
            runs.timed(runs.through_ray)  # warm-up: a Ray instance's first trial starts its pool
            for _ in range(repeats):
                times["in_process_ray_up"].append(runs.timed(runs.in_process))
                times["ray"].append(runs.timed(runs.through_ray))
        finally:
            if started:
                import ray

                ray.shutdown()
    return {k: statistics.median(v) for k, v in times.items() if v}, n


def search_throughput(
    work: Path, data: Path, device, candidates: int, repeats: int, with_ray: bool = True
) -> dict:
    t, n = time_searches(SearchRuns(work, data, device, candidates), repeats, with_ray)
    marginal = (t["in_process_4x"] - t["in_process"]) / (3 * n)
    ray_rows: dict = {"ray": "not measured (--no-ray)"}
    if with_ray:
        ray_rows = {
            "search_stage_s": {"in_process": t["in_process_ray_up"], "ray_trial": t["ray"]},
            "ray_over_in_process": t["ray"] / t["in_process_ray_up"],
            "ray_overhead_s_per_trial": t["ray"] - t["in_process_ray_up"],
        }
    return {
        "candidates": n,
        "s_per_candidate": {"pure_forward": t["pure"] / n, "search_stage": t["in_process"] / n},
        "candidates_per_min": {
            "pure_forward": 60 * n / t["pure"],
            "search_stage": 60 * n / t["in_process"],
        },
        "search_rate_over_pure_rate": t["pure"] / t["in_process"],
        # The stage's cost split into a fixed part (building the model, reading weights and
        # data, starting the MLflow logging process, plots, artifacts) and a per-candidate
        # part, from the same stage run with 4x the candidates: the per-candidate part against
        # the pure forward time is what a 1,000-candidate search sees.
        "stage_fixed_s": t["in_process"] - n * marginal,
        "stage_s_per_candidate_marginal": marginal,
        "per_candidate_overhead_over_pure": marginal / (t["pure"] / n) - 1,
        **ray_rows,
        "mlflow_cpu_ms_per_candidate": tracking_cost(work / "tracking"),
    }


def tracking_cost(folder: Path, n: int = 100) -> dict[str, float]:
    """CPU milliseconds per candidate of logging it to MLflow (a child run with its subnet,
    costs and score) into a sqlite store: in the searching process (sending it) and in the
    pipeline's logging process (writing it)."""
    import resource

    from nas.tracking.candidates import CandidateLogger
    from nas.tracking.runs import Tracker

    folder.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(f"sqlite:///{folder / 'mlflow.db'}", "tracking")
    parent = tracker.run("search", {"stage": "search"})
    params = {"vpt.depth": 3, "vpt.dims": "8,4,2", "lora.depth": 6, "lora.dims": "4,4,4,4,4,4"}
    metrics = {"val_acc": 0.5, "params": 12345, "added_flops": 678901, "round": 1}

    def children_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    def cost(candidates: int) -> tuple[float, float]:
        own, logger_cpu = time.process_time(), children_cpu()
        logger = CandidateLogger(tracker, parent, {"stage": "search"})
        for i in range(candidates):
            logger.log(f"{candidates}-{i}", f"candidate {i}", params, metrics, {"round": 1})
        logger.close()
        return time.process_time() - own, children_cpu() - logger_cpu

    start_own, start_logger = cost(0)  # the logging process's start-up alone
    own, logger = cost(n)
    return {
        "searching_process_ms": 1000 * (own - start_own) / n,
        "logging_process_ms": 1000 * (logger - start_logger) / n,
        "logging_process_startup_s": start_logger,
    }


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="training steps per timed run")
    parser.add_argument("--candidates", type=int, default=48)
    parser.add_argument(
        "--no-ray", action="store_true", help="skip the Ray Tune trial (a machine without Ray)"
    )
    parser.add_argument("--json", help="write the results here")


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(device),
        "torch": torch.__version__,
        "setting": "vit_fmnist (28x28 grey, width 192, 6 blocks), tiny_cpu space, mini-VTAB "
        "dsprites_loc",
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work / "data", ("dsprites_loc",), test_size=200, log=lambda *_: None)
        split = decode_split(read_vtab(work / "data" / "dsprites_loc")["train"], 28, 1)
        results["training"] = training_steps(
            load_space("tiny_cpu"), split, device, args.repeats, args.steps, 64
        )
        print(json.dumps(results["training"]), flush=True)
        results["search"] = search_throughput(
            work, work / "data", device, args.candidates, args.repeats, not args.no_ray
        )
        print(json.dumps(results["search"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0
