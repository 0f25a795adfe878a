"""The verify stage (``stages.verify``): before a winner is declared, the search's best
candidates and the anchors a user would try without a search (each module alone at its
largest size in budget, the largest subnets along each module, the spec's baselines) are trained
alone with a short recipe on train and scored on val; successive halving (ASHA, within each
dataset and seed) stops the weaker ones early. The best on val is what the later stages
retrain, so the supernet's ranking decides only which candidates get verified.

Each candidate's epochs are written to ``verify/<ds>-seed<k>/<label>.json`` as it trains; once
every candidate of a dataset and seed has ended, the ranking goes to MLflow (a run per
verification with a child per candidate, linked to the candidate's search run) and then to
``verify/<ds>-seed<k>/done.json``, the done marker a rerun skips."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from mlflow.entities import Metric

from nas.core.jsonio import read_json, write_json
from nas.families import build_prompted
from nas.pipeline.console import say
from nas.pipeline.context import (
    base_tags,
    data_params,
    device_for,
    load_splits,
    task_context,
    tracker_for,
)
from nas.pipeline.layout import RunLayout, done_marker, run_layout
from nas.pipeline.progress import Report, SweepProgress
from nas.pipeline.rates import Tuned, tuned
from nas.pipeline.stage import Halving, Pairs, Plan, Stage
from nas.pipeline.subnet_search import read_candidates_log
from nas.pipeline.tasks import VerifyPoint
from nas.search.anchors import anchors
from nas.space.cost import subnet_params
from nas.space.subnet import Subnet
from nas.spec.experiment import ExperimentSpec
from nas.spec.stages import TrainingSettings
from nas.tracking.candidates import subnet_params_flat
from nas.tracking.runs import Tracker
from nas.training.evaluate import evaluate
from nas.training.train import TrainConfig, train


def verify_rates(spec: ExperimentSpec, dataset: str, subnet: Subnet) -> tuple[str, Tuned]:
    """Whose rates a candidate trains at: a baseline's own (swept) rates where the candidate is
    that baseline, else the supernet's (with its swept module multipliers)."""
    for name, baseline in spec.retrain.subnet_baselines().items():
        if baseline == subnet:
            return f"baseline-{name}", tuned(spec, dataset, f"baseline-{name}")
    return "supernet", tuned(spec, dataset, "supernet")


def verify_points(spec: ExperimentSpec, base: dict[str, str], ds, seed: int) -> list[VerifyPoint]:
    """One dataset and seed's candidates: the search's ``top_k`` best (distinct: a search
    scores each subnet once), then the anchors it did not rank there, each once."""
    found = read_json(done_marker(run_layout(spec).search(ds.key, seed)))
    v = spec.verify
    scored = {
        e.subnet: e.score
        for e in read_candidates_log(run_layout(spec).search(ds.key, seed) / "candidates.jsonl")
    }
    runs = {
        key: run_id
        for key, (run_id, _) in tracker_for(spec).children(found["mlflow_run_id"]).items()
    }
    origins: dict[Subnet, list[str]] = {}
    for rank, cand in enumerate(found["top"][: v.top_k], 1):
        origins.setdefault(Subnet.from_data(cand["subnet"]), []).append(f"search rank {rank}")
    if v.anchors:
        named = {b: name for name, b in spec.retrain.subnet_baselines().items()}
        for subnet in anchors(spec.space, named):
            where = f"baseline {named[subnet]}" if subnet in named else "anchor"
            origins.setdefault(subnet, []).append(where)
    group = f"{ds.key}-seed{seed}"
    return [
        VerifyPoint(
            **base,
            dataset=ds.key,
            seed=seed,
            label=f"c{i:02d}",
            subnet=subnet.to_data(),
            origin=", ".join(origin),
            group=group,
            search_val_acc=scored.get(subnet),
            candidate_run_id=runs.get(subnet.key()),
        )
        for i, (subnet, origin) in enumerate(origins.items(), 1)
    ]


def run_verify_point(task: VerifyPoint, report: Report = lambda p: None) -> dict[str, Any]:
    """One candidate trained alone on train with the verify stage's recipe, scored on val
    after every epoch (ASHA may stop it after any); its epochs so far go to its file. A loss
    that turns NaN or infinite ends it with val accuracy 0 (recorded as diverged)."""
    spec, ds, seed = task_context(task)
    out = run_layout(spec).verify(ds.key, seed)
    subnet = Subnet.from_data(task.subnet)
    data = load_splits(spec, ds, ("train", "val"))
    torch.manual_seed(seed)
    model = build_prompted(spec.backbone, spec.space, data["train"], subnet=subnet, dataset=ds.key)
    model = model.to(device_for(spec))
    method, rates = verify_rates(spec, ds.key, subnet)
    stage: TrainingSettings = spec.supernet if method == "supernet" else spec.retrain
    v = spec.verify
    cfg = TrainConfig(
        epochs=v.epochs,
        batch_size=v.batch_size,
        lr=rates.lr,
        weight_decay=rates.weight_decay,
        warmup_epochs=0,
        seed=seed,
        module_lr={**stage.module_lr, **rates.module_lr},
        module_weight_decay=dict(stage.module_weight_decay),
    )
    mean, std = spec.backbone.normalisation()
    record: dict[str, Any] = {
        "label": task.label,
        "subnet": task.subnet,
        "origin": task.origin,
        "rates_of": method,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "module_lr": cfg.module_lr,
        "history": [],
    }
    started = time.time()

    def on_epoch(epoch: int, metrics: dict[str, float], _get_state) -> None:
        val_acc = evaluate(model, data["val"], mean=mean, std=std)
        record["history"].append(
            {
                "epoch": epoch,
                "val_acc": val_acc,
                "train_loss": metrics["train_loss"],
                "seconds": round(time.time() - started, 3),
            }
        )
        write_json(out / f"{task.label}.json", record)
        left = (time.time() - started) / epoch * (v.epochs - epoch)
        report(
            SweepProgress(
                "verify",
                ds.key,
                seed,
                label=task.label,
                eta_s=left,
                epoch=epoch,
                epochs=v.epochs,
                metrics=metrics,
                lr=cfg.lr,
                weight_decay=cfg.weight_decay,
                module_lr=rates.module_lr,
                val_acc=val_acc,
            )
        )

    try:
        train(model, data["train"], cfg, mean=mean, std=std, on_epoch=on_epoch)
    except FloatingPointError as exc:  # NaN/inf: this candidate at this rate is out
        record["diverged"] = str(exc)
        record["history"].append(
            {
                "epoch": len(record["history"]) + 1,
                "val_acc": 0.0,
                "train_loss": float("nan"),
                "seconds": round(time.time() - started, 3),
            }
        )
        write_json(out / f"{task.label}.json", record)
    return {"val_acc": record["history"][-1]["val_acc"]}


def rank(spec: ExperimentSpec, points: list[VerifyPoint], out: Path) -> list[dict[str, Any]]:
    """The candidates best first: those trained longest (ASHA's survivors), then by val
    accuracy at their last epoch, then the fewer parameters, then the order listed."""
    g = spec.space.geometry
    rows = []
    for order, point in enumerate(points):
        rec = read_json(out / f"{point.label}.json")
        last = rec["history"][-1]
        subnet = Subnet.from_data(point.subnet)
        rows.append(
            (
                (-len(rec["history"]), -last["val_acc"], subnet_params(subnet, g), order),
                {
                    "label": point.label,
                    "subnet": point.subnet,
                    "subnet_str": str(subnet),
                    "key": subnet.key(),
                    "origin": point.origin,
                    "score": last["val_acc"],
                    "search_score": point.search_val_acc,
                    "epochs": len(rec["history"]),
                    "train_loss": last["train_loss"],
                    "train_losses": [h["train_loss"] for h in rec["history"]],
                    "params": subnet_params(subnet, g),
                    "rates_of": rec["rates_of"],
                    "lr": rec["lr"],
                    "seconds": rec["history"][-1]["seconds"],
                    "diverged": rec.get("diverged"),
                    "mlflow_run_id": point.candidate_run_id,
                    "history": rec["history"],
                },
            )
        )
    return [row for _, row in sorted(rows, key=lambda r: r[0])]


def finish_verification(
    spec: ExperimentSpec, tracker: Tracker, points: list[VerifyPoint]
) -> dict[str, Any]:
    """A dataset and seed whose candidates have all ended: their ranking to MLflow (a parent
    run and a child per candidate, the winner tagged ``nas.chosen``), then to done.json."""
    first = points[0]
    spec_ds = next(d for d in spec.datasets if d.key == first.dataset)
    seed = first.seed
    out = run_layout(spec).verify(first.dataset, seed)
    ranked = rank(spec, points, out)
    found = read_json(done_marker(run_layout(spec).search(first.dataset, seed)))
    seconds = sum(r["seconds"] for r in ranked)
    epochs = sum(r["epochs"] for r in ranked)
    v = spec.verify
    tags = base_tags(spec, "verify", spec_ds, seed)
    val = load_splits(spec, spec_ds, ("val",))["val"]
    parent = tracker.run(
        f"verify {first.dataset} seed {seed}",
        tags,
        params={
            "top_k": v.top_k,
            "anchors": v.anchors,
            "epochs": v.epochs,
            "batch_size": v.batch_size,
            "grace_period": v.grace_period,
            "reduction_factor": v.reduction_factor,
            "candidates": len(points),
            "train_split": "train",
            "eval_split": "val",
            **data_params(val),
        },
        description=f"{len(points)} candidates of {first.dataset} (seed {seed}) trained alone "
        f"for up to {v.epochs} epochs on train, halved by ASHA on val; winner "
        f"{ranked[0]['subnet_str']} ({ranked[0]['origin']}) at val {ranked[0]['score']:.4f}",
    )
    tracker.client.set_tag(parent, "nas.search_run_id", found["mlflow_run_id"])
    _log_candidates(tracker, tags, parent, ranked)
    tracker.log_metrics(
        parent,
        {
            "verify_seconds": seconds,
            "verify_epochs": epochs,
            "best_val_acc": ranked[0]["score"],
            "best_search_rank": float(_search_rank(ranked[0]["origin"]) or 0),
        },
    )
    tracker.finish(parent)
    result = {
        "dataset": first.dataset,
        "seed": seed,
        "top": [{k: v for k, v in r.items() if k != "history"} for r in ranked],
        "candidates": len(points),
        "seconds": round(seconds, 2),
        "epochs_trained": epochs,
        "mlflow_run_id": found["mlflow_run_id"],  # the search's: what retraining links to
        "verify_run_id": parent,
    }
    write_json(done_marker(out), result)
    best = ranked[0]
    say(
        f"verify {first.dataset} seed {seed}: {best['subnet_str']} ({best['origin']}) best on "
        f"val at {best['score']:.4f} of {len(points)} candidates; {seconds:.0f} s of training"
    )
    return result


def _log_candidates(
    tracker: Tracker, tags: dict[str, Any], parent: str, ranked: list[dict[str, Any]]
) -> None:
    """A finished child run of ``parent`` per verified candidate (its epochs' val accuracy and
    training loss, linked to its search candidate run; the winner tagged ``nas.chosen``); each
    row gets its run's ID as ``verify_run_id``."""
    for place, row in enumerate(ranked, 1):
        subnet = Subnet.from_data(row["subnet"])
        child = tracker.run(
            f"{row['label']} {row['subnet_str']}",
            {**tags, "candidate": row["key"]},
            parent=parent,
            params={
                **subnet_params_flat(subnet.to_data()),
                "subnet": row["subnet_str"],
                "origin": row["origin"],
                "rates_of": row["rates_of"],
                "lr": row["lr"],
            },
        )
        now = int(time.time() * 1000)
        metrics = [
            Metric(name, float(h[name]), now, h["epoch"])
            for h in row["history"]
            for name in ("val_acc", "train_loss")
        ]
        metrics += [
            Metric("params", float(row["params"]), now, 0),
            Metric("place", float(place), now, 0),
        ]
        if row["search_score"] is not None:
            metrics.append(Metric("search_val_acc", float(row["search_score"]), now, 0))
        tracker.client.log_batch(child, metrics=metrics)
        if row["mlflow_run_id"]:
            tracker.client.set_tag(child, "nas.candidate_run_id", row["mlflow_run_id"])
        if place == 1:
            tracker.client.set_tag(child, "nas.chosen", "verified")
        tracker.finish(child)
        row["verify_run_id"] = child


def _search_rank(origin: str) -> int | None:
    for part in origin.split(", "):
        if part.startswith("search rank "):
            return int(part.removeprefix("search rank "))
    return None


class Verify(Stage):
    """The verify stage: one trial per candidate, ASHA within each dataset and seed."""

    name = "verify"

    def tasks(self, spec: ExperimentSpec, base: dict[str, str], pairs: Pairs) -> list[VerifyPoint]:
        return [p for ds, seed in pairs for p in verify_points(spec, base, ds, seed)]

    @staticmethod
    def folder(layout: RunLayout, task: VerifyPoint) -> Path:
        return layout.verify(task.dataset, task.seed)

    run = staticmethod(run_verify_point)

    def plan(self, spec: ExperimentSpec, base: dict[str, str], pairs: Pairs) -> Plan:
        """Each unfinished verification's candidates, ASHA within each dataset and seed; its
        ranking to MLflow as soon as its candidates have all ended."""
        todo_pairs = [
            (ds, seed)
            for ds, seed in pairs
            if not done_marker(run_layout(spec).verify(ds.key, seed)).is_file()
        ]
        todo = self.tasks(spec, base, todo_pairs)
        groups: dict[str, list[VerifyPoint]] = {}
        for point in todo:
            groups.setdefault(point.group, []).append(point)
        sizes = sorted({len(g) for g in groups.values()})
        tracker = tracker_for(spec)
        v = spec.verify

        def ended(group: str, trials: list[tuple[VerifyPoint, dict[str, Any]]]) -> None:
            finish_verification(spec, tracker, groups[group])

        return Plan(
            todo,
            f"== verify: {len(groups)} of {len(pairs)} verifications to run"
            + (f", {', '.join(map(str, sizes))} candidates each" if sizes else ""),
            Halving(v.epochs, v.grace_period, v.reduction_factor),
            {g: len(p) for g, p in groups.items()},
            ended,
        )
