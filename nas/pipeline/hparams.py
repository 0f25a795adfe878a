"""The hparams stage: per dataset and method (the supernet, each baseline, and with
``sweep_searched`` each searched subnet) a learning-rate x weight-decay (x module multiplier)
grid on train/val, early-stopped with ASHA; its winners set the later stages' rates."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nas.core.jsonio import read_json, write_json
from nas.families import build_prompted
from nas.pipeline.console import say
from nas.pipeline.context import (
    base_tags,
    data_params,
    dataset_input,
    device_for,
    eta_s,
    load_splits,
    supernet_steps,
    task_context,
    tracker_for,
)
from nas.pipeline.layout import RunLayout, done_marker, run_layout, searched_top
from nas.pipeline.progress import Report, SweepProgress
from nas.pipeline.rates import searched_method
from nas.pipeline.stage import Halving, Pairs, Plan, Stage
from nas.pipeline.tasks import SweepPoint
from nas.space.subnet import Subnet
from nas.spec.datasets import DatasetSpec
from nas.spec.experiment import ExperimentSpec
from nas.tracking.runs import Tracker
from nas.training.evaluate import evaluate_candidates
from nas.training.sampling import make_sampler
from nas.training.train import TrainConfig, train


def run_hparams(task: SweepPoint, report: Report = lambda p: None) -> dict[str, Any]:
    """One point of the sweep: train on the training split, score on validation every epoch
    (the scheduler stops unpromising points early). The supernet is scored by the mean
    accuracy of a fixed set of random subnets; a baseline by its own accuracy."""
    spec, ds, seed = task_context(task)
    method, lr, wd = task.method, float(task.lr), float(task.weight_decay)
    device = device_for(spec)
    data = load_splits(spec, ds, ("train", "val"))
    torch.manual_seed(seed)
    h = spec.hparams
    stage = spec.supernet if method == "supernet" else spec.retrain
    if method == "supernet":
        model = build_prompted(spec.backbone, spec.space, data["train"], dataset=ds.key)
        rng = random.Random(seed)
        # the subnets that score a point: in the budget when the supernet samples only there
        draw = make_sampler(spec.space, "uniform", spec.supernet.in_budget)
        scored = [draw(rng) for _ in range(h.eval_subnets)]
        sample = supernet_steps(spec)
    else:  # a baseline, or a searched subnet (its own sweep: the task carries the subnet)
        name = method.removeprefix("baseline-")
        if task.subnet is not None:
            subnet = Subnet.from_data(task.subnet)
        else:
            subnet = spec.retrain.baselines[name]
        model = build_prompted(
            spec.backbone,
            spec.space,
            data["train"],
            subnet=subnet,
            full_finetune=method.startswith("baseline-") and name in spec.retrain.full_finetune,
            dataset=ds.key,
        )
        scored, sample = [subnet], None
    model = model.to(device)
    cfg = TrainConfig(
        epochs=h.epochs,
        batch_size=h.batch_size,
        lr=lr,
        weight_decay=wd,
        warmup_epochs=0,
        seed=seed,
        module_lr={**stage.module_lr, **task.module_lr},
        module_weight_decay=dict(stage.module_weight_decay),
    )
    mean, std = spec.backbone.normalisation()
    last = {"val_acc": 0.0}
    started = time.time()

    def on_epoch(epoch: int, metrics: dict[str, float], _get_state) -> None:
        accs = evaluate_candidates(model, scored, data["val"], mean=mean, std=std)
        last["val_acc"] = sum(accs) / len(accs)
        report(
            SweepProgress(
                "hparams",
                ds.key,
                seed,
                label=method,
                eta_s=eta_s(started, epoch, h.epochs - epoch),
                epoch=epoch,
                epochs=h.epochs,
                metrics=metrics,
                lr=lr,
                weight_decay=wd,
                module_lr=task.module_lr,
                val_acc=last["val_acc"],
            )
        )

    train(model, data["train"], cfg, mean=mean, std=std, sample_subnet=sample, on_epoch=on_epoch)
    return {"val_acc": last["val_acc"]}


@dataclass(frozen=True)
class Sweep:
    """One learning-rate sweep of the hparams stage: a method on a dataset, trained with one
    seed; its winner is written to hparams/<dataset>/<method>/done.json."""

    ds: DatasetSpec
    method: str  # "supernet", "baseline-NAME" or searched_method(...)
    seed: int
    subnet: dict[str, Any] | None = None  # a searched subnet's (a baseline's is in the spec)

    @property
    def group(self) -> str:
        return f"{self.ds.key}/{self.method}"

    @property
    def multipliers(self) -> bool:
        """Whether stages.hparams.module_lrs joins the grid: for the supernet and the searched
        subnets (a baseline is one module; it takes stages.retrain.module_lr)."""
        return not self.method.startswith("baseline-")


def hparams_sweeps(spec: ExperimentSpec) -> list[Sweep]:
    """Stage 0's sweeps: the supernet's (when the search runs) and each baseline's, per
    dataset, trained with the first seed; the winner serves every seed."""
    methods = ["supernet"] if spec.search.enabled else []
    zero_shot = spec.backbone.classifies_by_name  # an empty subnet on CLIP trains nothing
    methods += [
        f"baseline-{name}"
        for name, subnet in spec.retrain.baselines.items()
        if not (zero_shot and not subnet)
    ]
    return [Sweep(ds, method, spec.seeds[0]) for ds in spec.datasets for method in methods]


def searched_sweeps(spec: ExperimentSpec, pairs) -> list[Sweep]:
    """With ``stages.hparams.sweep_searched``: one sweep per searched subnet that will be
    retrained (each dataset, seed and rank up to ``retrain.top_k``), with that seed."""
    out = []
    for ds, seed in pairs:
        found = searched_top(spec, ds.key, seed)
        for rank, cand in enumerate(found["top"][: spec.retrain.top_k], 1):
            method = searched_method(f"rank{rank}", seed)
            out.append(Sweep(ds, method, seed, cand["subnet"]))
    return out


def plan_sweeps(
    spec: ExperimentSpec, base: dict[str, str], sweeps: list[Sweep], title: str = "hparams"
) -> Plan:
    """The lr x wd grid of every unfinished sweep, all in one Tune run so that the cluster
    stays busy; ASHA stops points early, comparing each only with its own sweep. A sweep's
    winner is written to hparams/<ds>/<method>/done.json and tracked in MLflow as soon as its
    last point ends (``on_group``), so an interrupted stage keeps every finished sweep; the
    later stages read the winners."""
    h = spec.hparams
    todo = {
        s.group: s
        for s in sweeps
        if not done_marker(run_layout(spec).hparams(s.ds.key, s.method)).is_file()
    }
    size = {s.group: len(sweep_points(spec, s, base)) for s in sweeps}
    tracker = tracker_for(spec)
    # A sweep finished before a stop may have lost its MLflow run (stopped between writing
    # done.json and logging): log it again from its done.json.
    for sweep in sweeps:
        if sweep.group in todo:
            continue
        run_id = tracker.find_run(sweep_tags(spec, sweep))
        if run_id is None or tracker.client.get_run(run_id).info.status != "FINISHED":
            track_sweep(spec, tracker, sweep)

    def ended(group: str, trials: list[tuple[SweepPoint, dict[str, Any]]]) -> None:
        finish_sweep(spec, tracker, todo[group], [point_of(*t) for t in trials])

    return Plan(
        [point for s in todo.values() for point in sweep_points(spec, s, base)],
        f"== {title}: {len(todo)} of {len(sweeps)} sweeps to run, "
        f"{', '.join(str(n) for n in sorted(set(size.values())))} points each",
        Halving(h.epochs, h.grace_period, h.reduction_factor),
        size,
        ended,
    )


def sweep_points(spec: ExperimentSpec, sweep: Sweep, base: dict[str, str]) -> list[SweepPoint]:
    """The tasks of one sweep: every lr x wd (x module multipliers) point."""
    h = spec.hparams
    grid = h.module_lr_grid() if sweep.multipliers else [{}]
    return [
        SweepPoint(
            **base,
            dataset=sweep.ds.key,
            seed=sweep.seed,
            method=sweep.method,
            lr=lr,
            weight_decay=wd,
            module_lr=scales,
            subnet=sweep.subnet,
            group=sweep.group,
        )
        for lr in h.lrs
        for wd in h.weight_decays
        for scales in grid
    ]


def point_of(task: SweepPoint, result: dict[str, Any]) -> dict[str, Any]:
    """One ended point of a sweep, as its done.json lists it."""
    return {
        "lr": task.lr,
        "weight_decay": task.weight_decay,
        **({"module_lr": task.module_lr} if task.module_lr else {}),
        "val_acc": result.get("val_acc", 0.0),
        "epochs": result.get("training_iteration", 0),
    }


def sweep_tags(spec: ExperimentSpec, sweep: Sweep) -> dict[str, Any]:
    return {**base_tags(spec, "hparams", sweep.ds, sweep.seed), "label": sweep.method}


def finish_sweep(
    spec: ExperimentSpec, tracker: Tracker, sweep: Sweep, points: list[dict[str, Any]]
) -> None:
    """A sweep whose every point ended: its winner (best validation accuracy; of equals, the
    one that ran longest) to done.json, then to MLflow; a winner at the grid's edge is said."""
    points.sort(key=lambda p: (p["lr"], p["weight_decay"], sorted(p.get("module_lr", {}).items())))
    best = max(points, key=lambda p: (p["val_acc"], p["epochs"]))
    record = {**best, "seed": sweep.seed, "grid": points}
    if sweep.subnet is not None:
        record["subnet"] = sweep.subnet
    write_json(done_marker(run_layout(spec).hparams(sweep.ds.key, sweep.method)), record)
    track_sweep(spec, tracker, sweep)
    note = grid_edge_note(best["lr"], spec.hparams.lrs)
    if note:
        say(f"hparams {sweep.ds.key} {sweep.method}: {note}")


def track_sweep(spec: ExperimentSpec, tracker: Tracker, sweep: Sweep) -> None:
    """The sweep's MLflow run from its done.json (again, after a stop part-way through)."""
    h, ds = spec.hparams, sweep.ds
    out = run_layout(spec).hparams(ds.key, sweep.method)
    best = read_json(done_marker(out))
    # the splits' content hashes, one split in memory at a time (cached by the sweep's points)
    seen: dict[str, Any] = {}
    inputs = []
    for name in ("train", "val"):
        split = load_splits(spec, ds, (name,))[name]
        seen |= {f"{name}_images": len(split), **data_params(split)}
        inputs.append(dataset_input(ds.key, split, seen[f"data.{name}.sha256"]))
        del split
    params: dict[str, Any] = {
        "lrs": list(h.lrs),
        "weight_decays": list(h.weight_decays),
        "epochs": h.epochs,
        "train_split": "train",
        "train_images": seen.pop("train_images"),
        "eval_split": "val",
        "eval_images": seen.pop("val_images"),
        **seen,
        "chosen_lr": best["lr"],
        "chosen_weight_decay": best["weight_decay"],
        **{f"module_lrs.{k}": list(v) for k, v in h.module_lrs.items() if sweep.multipliers},
        **{f"chosen_module_lr.{k}": v for k, v in best.get("module_lr", {}).items()},
    }
    if sweep.subnet is not None:
        params["subnet"] = str(Subnet.from_data(sweep.subnet))
    run_id = tracker.run(
        f"hparams {ds.key} {sweep.method}",
        sweep_tags(spec, sweep),
        params=params,
        description=f"Learning-rate sweep of {sweep.method} on {ds.key}: {len(best['grid'])} "
        f"points, {h.epochs} epochs on train, scored on val; chose lr {best['lr']:g}",
    )
    tracker.client.log_inputs(run_id, datasets=inputs)
    tracker.log_metrics(run_id, {"best_val_acc": best["val_acc"]})
    tracker.log_artifact(run_id, done_marker(out))
    tracker.finish(run_id)


def grid_edge_note(chosen: float, grid: Sequence[float]) -> str | None:
    """A warning when the sweep's winner is the grid's largest or smallest learning rate: the
    best one may lie outside the grid. (A winner at the largest rate of a sweep shorter than
    the final training can also be one that diverges over the longer schedule.)"""
    if len(grid) < 2 or min(grid) < chosen < max(grid):
        return None
    edge = "largest" if chosen == max(grid) else "smallest"
    return (
        f"the best learning rate, {chosen:g}, is the {edge} of the grid "
        f"{[float(f'{v:g}') for v in sorted(grid)]}; the best may lie beyond it (widen "
        "stages.hparams.lrs)"
    )


class Hparams(Stage):
    """The sweeps before the search (the supernet's and each baseline's), or with
    ``searched=True`` those of the searched subnets after it (``hparams.sweep_searched``)."""

    name = "hparams"

    def __init__(self, searched: bool = False) -> None:
        self.searched = searched
        self.title = "hparams (searched subnets)" if searched else "hparams"

    def sweeps(self, spec: ExperimentSpec, pairs: Pairs) -> list[Sweep]:
        """The sweeps of the datasets in ``pairs`` (those before the search: at the spec's
        first seed, whichever seeds ``pairs`` names)."""
        if self.searched:
            return searched_sweeps(spec, pairs)
        keys = {ds.key for ds, _ in pairs}
        return [s for s in hparams_sweeps(spec) if s.ds.key in keys]

    def tasks(self, spec: ExperimentSpec, base: dict[str, str], pairs: Pairs) -> list[SweepPoint]:
        return [p for s in self.sweeps(spec, pairs) for p in sweep_points(spec, s, base)]

    @staticmethod
    def folder(layout: RunLayout, task: SweepPoint) -> Path:
        """A sweep's: its points share it (the sweep is done when its winner is chosen)."""
        return layout.hparams(task.dataset, task.method)

    run = staticmethod(run_hparams)

    def plan(self, spec: ExperimentSpec, base: dict[str, str], pairs: Pairs) -> Plan:
        return plan_sweeps(spec, base, self.sweeps(spec, pairs), title=self.title)
