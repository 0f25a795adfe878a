"""The work of one trial of each stage. Nothing here knows about Ray: progress goes to a
``report`` callback; everything a later run needs to resume is in the output folder.

Output layout (per dataset key and seed, ``<ds>-seed<k>``)::

    hparams/<ds>/<method>/done.json             the sweep's winner (one sweep for all seeds)
    supernet/<ds>-seed<k>/state.pt              training state every checkpoint_every epochs
    supernet/<ds>-seed<k>/supernet.safetensors  final module and head weights; done.json
    search/<ds>-seed<k>/candidates.jsonl        every evaluated candidate, appended as scored
    search/<ds>-seed<k>/candidates.csv          the table of all candidates; done.json
    retrain/<ds>-seed<k>/<label>/model/         subnet.yaml + weights.safetensors; done.json
"""

from __future__ import annotations

import csv
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from nas import factory, sampling
from nas.cost import added_flops, subnet_params
from nas.data.decode import DecodedSplit, decode_split
from nas.data.formats import Split, read_few_shot, read_image_folder, read_vtab
from nas.errors import NasError
from nas.sampling import make_sampler
from nas.search import Evaluated, make_search
from nas.spec import DatasetSpec, ExperimentSpec, load_spec
from nas.subnet import Subnet
from nas.tracking import CandidateLogger, Tracker, logging_processes, subnet_params_flat
from trainers.train import (
    SupernetSteps,
    TrainConfig,
    evaluate,
    evaluate_candidates,
    load_trainable,
    train,
)

Report = Callable[[dict[str, Any]], None]


# -- shared helpers ---------------------------------------------------------------------------


def write_json(path: Path, data: Any) -> None:
    """Atomically: a reader never sees half a file, a kill never leaves one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """A JSON file this project wrote; damaged, it is one error naming it and the fix."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NasError(
            f"{path}: damaged ({exc}); it records a finished step of this run: remove it to "
            "redo that step, or restore it from a backup"
        ) from None


def load_state(path: Path) -> dict[str, Any] | None:
    """A training's resume state (``state.pt``), None when there is none; damaged, one error
    naming the file and the fix."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # a truncated zip, a file of something else
        raise NasError(
            f"{path}: damaged resume state ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); remove it to restart that "
            "training from its first epoch"
        ) from None


def run_key(dataset: str, seed: int) -> str:
    return f"{dataset}-seed{seed}"


def dataset_root(spec: ExperimentSpec, ds: DatasetSpec) -> Path:
    if ds.format == "mini-vtab":
        return Path(ds.root) if ds.root else spec.output / "data" / "mini-vtab"
    return Path(ds.root)


def load_splits(
    spec: ExperimentSpec, ds: DatasetSpec, names: tuple[str, ...]
) -> dict[str, DecodedSplit]:
    """Decoded splits at the backbone's input size (cached under <output>/cache)."""
    splits = read_splits(spec, ds)
    g = spec.backbone.geometry()
    size = g.patch_size * round(g.num_patches**0.5)  # square inputs
    return {n: decode_split(splits[n], size, g.in_chans, spec.output / "cache") for n in names}


def read_splits(spec: ExperimentSpec, ds: DatasetSpec) -> dict[str, Split]:
    """The dataset's splits as lists of (image, label) entries, nothing decoded."""
    folder = dataset_root(spec, ds) / ds.name
    if ds.format in ("mini-vtab", "vtab"):
        splits = read_vtab(folder, duplicates=ds.duplicates)
    elif ds.format == "few-shot":
        splits = read_few_shot(folder, ds.shots, ds.split_seed, duplicates=ds.duplicates)
    else:
        # val and test take train's classes: a split missing a class keeps every label
        train = read_image_folder(Path(ds.root) / ds.name / "train")
        splits = {"train": train}
        for name in ("val", "test"):
            splits[name] = read_image_folder(Path(ds.root) / ds.name / name, train.class_names)
        splits["trainval"] = Split(
            "trainval",
            splits["train"].entries + splits["val"].entries,
            splits["train"].source,
            splits["train"].num_classes,
            splits["train"].class_names,
        )
    return splits


def data_params(*splits: DecodedSplit) -> dict[str, str]:
    """The content hashes of the decoded splits a run trains or scores on, as MLflow params
    (``data.<split>.sha256``): every run records exactly which pixels and labels it saw."""
    return {f"data.{split.name}.sha256": split.content_hash() for split in splits}


def split_params(fit: DecodedSplit, scored: DecodedSplit) -> dict[str, Any]:
    """Which split a run trained on, on how many images, and which split scored it (MLflow
    params ``train_split``, ``train_images``, ``eval_split``)."""
    return {"train_split": fit.name, "train_images": len(fit), "eval_split": scored.name}


def mini_vtab_entry(spec: ExperimentSpec, ds: DatasetSpec) -> dict[str, Any] | None:
    """A prepared mini-VTAB task's manifest entry: ``<root>/<task>/manifest.json`` (prepared by
    the pipeline) or the task's part of ``<root>/manifest.json`` (``nas data prepare``)."""
    root = dataset_root(spec, ds)
    own, shared = root / ds.name / "manifest.json", root / "manifest.json"
    if own.is_file():
        return read_json(own)
    if shared.is_file():
        return read_json(shared).get("tasks", {}).get(ds.name)
    return None


def dataset_group(spec: ExperimentSpec, ds: DatasetSpec) -> str | None:
    """The VTAB group (natural / specialized / structured) of a dataset, when known."""
    from nas.data.catalog import vtab_group

    if ds.format == "mini-vtab":
        entry = mini_vtab_entry(spec, ds)
        return entry.get("group") if entry else None
    return vtab_group(ds.name)


def device_for(spec: ExperimentSpec) -> torch.device:
    return torch.device("cuda" if spec.gpus > 0 and torch.cuda.is_available() else "cpu")


def tracker_for(spec: ExperimentSpec) -> Tracker:
    return Tracker(
        spec.tracking_uri,
        spec.mlflow_experiment,
        artifact_location=spec.artifact_location,
    )


def task_context(task: dict[str, Any]) -> tuple[ExperimentSpec, DatasetSpec, int]:
    path = Path(task["spec"])
    if not path.is_file():  # relative to a working directory this process does not share
        path = Path(task.get("spec_abs", task["spec"]))
    spec = load_spec(path, output=task["output"])
    ds = next(d for d in spec.datasets if d.key == task["dataset"])
    return spec, ds, int(task["seed"])


def base_tags(spec: ExperimentSpec, stage: str, ds: DatasetSpec, seed: int) -> dict[str, Any]:
    return {"spec_hash": spec.hash(), "stage": stage, "dataset": ds.key, "seed": seed}


# -- hparams ----------------------------------------------------------------------------------


def hparams_dir(spec: ExperimentSpec, dataset: str, method: str) -> Path:
    """One sweep per dataset and method, shared by every seed: the seeds measure the spread of
    training with the chosen hyperparameters (as VPT's protocol does), not of the choice."""
    return spec.output / "hparams" / dataset / method


@dataclass(frozen=True)
class Tuned:
    """A method's training rates: the hparams stage's winner, or the stage's own settings."""

    lr: float
    weight_decay: float
    module_lr: dict[str, float] = field(default_factory=dict)  # swept multipliers only


def searched_method(label: str, seed: int) -> str:
    """The hparams method of one searched subnet's own sweep (``hparams.sweep_searched``)."""
    return f"searched-{label}-seed{seed}"


def retrain_method(spec: ExperimentSpec, label: str, role: str, seed: int) -> str:
    """Whose swept rates a retraining uses: a baseline its own; a searched subnet its own
    sweep's with ``hparams.sweep_searched``, else the supernet's (NOAH's recipe)."""
    if role == "baseline":
        return label
    return searched_method(label, seed) if spec.hparams.sweep_searched else "supernet"


def tuned(spec: ExperimentSpec, dataset: str, method: str) -> Tuned:
    """The rates of a method: the hparams stage's winner when it ran, else the stage's own
    settings ("supernet" covers the supernet and, unless they have sweeps of their own
    (``searched_method``), the searched subnets' retraining; "baseline-NAME" a baseline's
    retraining). Swept module multipliers replace the stage's own for the kinds they name
    (``TrainingStage.train_config``)."""
    done = hparams_dir(spec, dataset, method) / "done.json"
    if spec.hparams.enabled and done.is_file():
        winner = read_json(done)
        return Tuned(
            float(winner["lr"]),
            float(winner["weight_decay"]),
            {k: float(v) for k, v in winner.get("module_lr", {}).items()},
        )
    if method == "supernet":
        return Tuned(spec.supernet.lr, spec.supernet.weight_decay)
    return Tuned(spec.retrain.lr, spec.retrain.weight_decay)


def supernet_steps(spec: ExperimentSpec) -> SupernetSteps:
    """What each supernet training step trains, as the supernet stage's settings say."""
    return sampling.supernet_steps(spec.space, spec.supernet)


def eta_s(started: float, done: int, left: int) -> float:
    """Seconds left, at the pace of the ``done`` epochs run since ``started``."""
    return (time.time() - started) / max(done, 1) * left


def run_hparams(task: dict[str, Any], report: Report = lambda m: None) -> dict[str, Any]:
    """One point of the sweep: train on the training split, score on validation every epoch
    (the scheduler stops unpromising points early). The supernet is scored by the mean
    accuracy of a fixed set of random subnets; a baseline by its own accuracy."""
    spec, ds, seed = task_context(task)
    method, lr, wd = task["method"], float(task["lr"]), float(task["weight_decay"])
    device = device_for(spec)
    data = load_splits(spec, ds, ("train", "val"))
    torch.manual_seed(seed)
    h = spec.hparams
    stage = spec.supernet if method == "supernet" else spec.retrain
    if method == "supernet":
        model = factory.supernet(spec.space, spec.backbone, data["train"], ds.key)
        rng = random.Random(seed)
        # the subnets that score a point: in the budget when the supernet samples only there
        draw = make_sampler(spec.space, "uniform", spec.supernet.in_budget)
        scored = [draw(rng) for _ in range(h.eval_subnets)]
        sample = supernet_steps(spec)
    else:  # a baseline, or a searched subnet (its own sweep: the task carries the subnet)
        name = method.removeprefix("baseline-")
        if "subnet" in task:
            subnet = Subnet.from_data(task["subnet"])
        else:
            subnet = spec.retrain.baselines[name]
        model = factory.subnet_model(
            spec.space,
            spec.backbone,
            subnet,
            data["train"],
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
        module_lr={**stage.module_lr, **task.get("module_lr", {})},
        module_weight_decay=dict(stage.module_weight_decay),
    )
    mean, std = spec.backbone.normalisation()
    last = {"val_acc": 0.0}
    started = time.time()

    def on_epoch(epoch: int, metrics: dict[str, float], _get_state) -> None:
        accs = evaluate_candidates(model, scored, data["val"], mean=mean, std=std)
        last["val_acc"] = sum(accs) / len(accs)
        report(
            {
                "stage": "hparams",
                "dataset": ds.key,
                "seed": seed,
                **metrics,  # its "lr" is the scheduled one; the point's own lr wins
                "label": method,
                "lr": lr,
                "weight_decay": wd,
                "module_lr": task.get("module_lr", {}),
                "epoch": epoch,
                "epochs": h.epochs,
                "val_acc": last["val_acc"],
                "eta_s": eta_s(started, epoch, h.epochs - epoch),
            }
        )

    train(model, data["train"], cfg, mean=mean, std=std, sample_subnet=sample, on_epoch=on_epoch)
    return {"val_acc": last["val_acc"]}


# -- supernet ---------------------------------------------------------------------------------


def supernet_dir(spec: ExperimentSpec, dataset: str, seed: int) -> Path:
    return spec.output / "supernet" / run_key(dataset, seed)


def run_supernet(task: dict[str, Any], report: Report = lambda m: None) -> dict[str, Any]:
    spec, ds, seed = task_context(task)
    out = supernet_dir(spec, ds.key, seed)
    if (out / "done.json").is_file():
        return read_json(out / "done.json")
    device = device_for(spec)
    data = load_splits(spec, ds, ("train",))["train"]
    torch.manual_seed(seed)
    model = factory.supernet(spec.space, spec.backbone, data, ds.key).to(device)
    st = spec.supernet
    rates = tuned(spec, ds.key, "supernet")
    cfg = st.train_config(
        lr=rates.lr, weight_decay=rates.weight_decay, seed=seed, module_lr=rates.module_lr
    )
    state_path = out / "state.pt"
    state = load_state(state_path)
    tracker = tracker_for(spec)
    run_id = tracker.run(
        f"supernet {ds.key} seed {seed}",
        base_tags(spec, "supernet", ds, seed),
        params={
            **cfg.to_dict(),
            "space": spec.space.name,
            "train_split": data.name,
            "train_images": len(data),
            **data_params(data),
        },
    )
    mean, std = spec.backbone.normalisation()
    started = time.time()

    def on_epoch(epoch: int, metrics: dict[str, float], get_state) -> None:
        tracker.log_metrics(run_id, metrics, step=epoch)
        if epoch % st.checkpoint_every == 0 or epoch == cfg.epochs:
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / f".state.{os.getpid()}.tmp"
            torch.save(get_state(), tmp)
            os.replace(tmp, state_path)
        report(
            {
                "stage": "supernet",
                "dataset": ds.key,
                "seed": seed,
                "epoch": epoch,
                "epochs": cfg.epochs,
                **metrics,
                "eta_s": eta_s(
                    started, epoch - (state["epoch"] if state else 0), cfg.epochs - epoch
                ),
            }
        )

    train(
        model,
        data,
        cfg,
        mean=mean,
        std=std,
        sample_subnet=supernet_steps(spec),
        state=state,
        on_epoch=on_epoch,
    )
    save_file(
        {k: v.contiguous() for k, v in model.trainable_state_dict().items()},
        str(out / "supernet.safetensors"),
    )
    result = {
        "dataset": ds.key,
        "seed": seed,
        "num_classes": data.num_classes,
        "mlflow_run_id": run_id,
        "node": task.get("node"),
    }
    return finish(tracker, run_id, out, result)


# -- search -----------------------------------------------------------------------------------


def search_dir(spec: ExperimentSpec, dataset: str, seed: int) -> Path:
    return spec.output / "search" / run_key(dataset, seed)


def read_candidates_log(path: Path) -> list[Evaluated]:
    """The candidates a search scored before a stop. A last line cut by a kill is cut off the
    file too, so that what is appended next starts on a line of its own; a damaged line
    before the last is an error naming it."""
    if not path.is_file():
        return []
    out, good = [], 0
    data = path.read_bytes()
    lines = data.split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            out.append(Evaluated.from_data(json.loads(line)))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            if any(rest.strip() for rest in lines[number:]):
                raise NasError(
                    f"{path}:{number}: damaged candidate line (lines after it are intact); "
                    "remove that line to continue the search"
                ) from None
            break
        good += len(line) + 1
    good = min(good, len(data))
    if good < len(data) or (data and not data.endswith(b"\n")):
        with open(path, "r+b") as f:  # cut the partial last line (and end on a newline)
            f.truncate(good)
            if good and not data[:good].endswith(b"\n"):
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
    return out


def finish(tracker: Tracker, run_id: str, out: Path, result: dict[str, Any]) -> dict[str, Any]:
    """End a trial's work: its MLflow run finished first, then ``done.json``, so that a stop in
    between redoes this end on the rerun instead of leaving the run unfinished for good."""
    tracker.finish(run_id)
    write_json(out / "done.json", result)
    return result


def run_supernet_and_search(
    task: dict[str, Any], report: Report = lambda m: None
) -> dict[str, Any]:
    """The supernet, then its search: the pipeline runs both in one trial per dataset and
    seed. Each part resumes on its own (a finished supernet is not retrained)."""
    run_supernet(task, report)
    return run_search(task, report)


#: Held (shared) by a search's candidate loggers while they live: a stopped run waits on it.
LOGGERS_LOCK = ".loggers.lock"


def run_search(task: dict[str, Any], report: Report = lambda m: None) -> dict[str, Any]:
    spec, ds, seed = task_context(task)
    out = search_dir(spec, ds.key, seed)
    if (out / "done.json").is_file():
        return read_json(out / "done.json")
    out.mkdir(parents=True, exist_ok=True)
    device = device_for(spec)
    val = load_splits(spec, ds, ("val",))["val"]
    s = spec.search
    tracker = tracker_for(spec)
    tags = base_tags(spec, "search", ds, seed)
    parent = tracker.run(
        f"search {ds.key} seed {seed}",
        tags,
        params={
            "algorithm": s.algorithm,
            "cost": s.cost,
            **s.options,
            "eval_split": val.name,
            "eval_images": len(val),
            **data_params(val),
        },
    )
    # The loggers start (import MLflow) while the model is built.
    logger = CandidateLogger(
        tracker, parent, tags, logging_processes(spec.cpus), lock=out / LOGGERS_LOCK
    )
    weights = load_file(str(supernet_dir(spec, ds.key, seed) / "supernet.safetensors"))
    model = factory.supernet(spec.space, spec.backbone, val, ds.key).to(device)
    load_trainable(model, weights)
    mean, std = spec.backbone.normalisation()
    algo = make_search(s.algorithm, spec.space, seed=seed, cost=s.cost, **s.options)
    log_path = out / "candidates.jsonl"
    known = {e.subnet: e for e in read_candidates_log(log_path)}
    algo.restore(list(known.values()))

    def log_candidate(e: Evaluated) -> None:
        logger.log(
            e.subnet.key(),
            str(e.subnet),
            subnet_params_flat(e.subnet.to_data()),
            _candidate_metrics(spec, e),
            {"round": e.round},
        )

    for e in known.values():  # logged before a kill? CandidateLogger skips those already there
        log_candidate(e)
    evaluated_now = 0
    started = time.time()
    with open(log_path, "a") as log:

        def score(fresh: list[Subnet]) -> list[float]:
            return evaluate_candidates(
                model,
                fresh,
                val,
                mean=mean,
                std=std,
                batch_size=s.eval_batch_size,
            )

        def on_scored(e: Evaluated) -> None:
            nonlocal evaluated_now
            evaluated_now += 1
            log.write(json.dumps(e.to_data()) + "\n")
            log.flush()
            os.fsync(log.fileno())
            log_candidate(e)

        def on_round(batch: list[Subnet]) -> None:
            best = algo.best(1)[0]
            tracker.log_metrics(
                parent,
                {
                    "best_val_acc": best.score,
                    "round_mean_val_acc": sum(known[c].score for c in batch) / len(batch),
                },
                step=algo.round,
            )
            report(
                {
                    "stage": "search",
                    "dataset": ds.key,
                    "seed": seed,
                    "round": algo.round,
                    "evaluated": len(algo.history),
                    "planned": algo.planned,
                    "best_val_acc": best.score,
                    "eta_s": (time.time() - started)
                    / max(evaluated_now, 1)
                    * max(algo.planned - len(algo.history), 0),
                }
            )

        algo.run(score, known, on_scored, on_round)
    logger.close()
    ranking = [
        e.to_data() | {"key": e.subnet.key(), "subnet_str": str(e.subnet)}
        for e in algo.best(len(algo.history))
    ]
    _write_table(out / "candidates.csv", algo.history, spec)
    tracker.log_artifact(parent, out / "candidates.csv")
    from nas.plots import plot_search

    cost_label = "trainable parameters" if s.cost == "params" else "added FLOPs"
    for png in plot_search(
        algo.history,
        spec.space,
        algo.best(1)[0].subnet,
        out / "plots",
        f"{ds.key} seed {seed} ({s.algorithm})",
        cost_label,
    ):
        tracker.log_artifact(parent, png, "plots")
    result = {
        "dataset": ds.key,
        "seed": seed,
        "evaluated": len(algo.history),
        "evaluated_this_run": evaluated_now,
        "top": ranking[: max(1, spec.retrain.top_k)],
        "mlflow_run_id": parent,
    }
    return finish(tracker, parent, out, result)


def _candidate_metrics(spec: ExperimentSpec, e: Evaluated) -> dict[str, float]:
    g = spec.space.geometry
    return {
        "val_acc": e.score,
        "params": subnet_params(e.subnet, g),
        "added_flops": added_flops(e.subnet, g),
        "round": e.round,
    }


def _write_table(path: Path, history: list[Evaluated], spec: ExperimentSpec) -> None:
    g = spec.space.geometry
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["round", "subnet", "val_acc", "params", "added_flops"])
        for e in history:
            w.writerow(
                [
                    e.round,
                    str(e.subnet),
                    f"{e.score:.4f}",
                    subnet_params(e.subnet, g),
                    added_flops(e.subnet, g),
                ]
            )


# -- retrain ----------------------------------------------------------------------------------


def retrain_dir(spec: ExperimentSpec, dataset: str, seed: int, label: str) -> Path:
    return spec.output / "retrain" / run_key(dataset, seed) / label


def run_retrain(task: dict[str, Any], report: Report = lambda m: None) -> dict[str, Any]:
    """Retrain one subnet from the pretrained backbone on the dataset's retraining split
    (``DatasetSpec.retrain_split``: train+val, or a few-shot protocol's K shots alone); test
    once at the end."""
    spec, ds, seed = task_context(task)
    label, subnet = task["label"], Subnet.from_data(task["subnet"])
    out = retrain_dir(spec, ds.key, seed, label)
    if (out / "done.json").is_file():
        return read_json(out / "done.json")
    device = device_for(spec)
    fit = ds.retrain_split
    data = load_splits(spec, ds, (fit, "test"))
    num_classes = data[fit].num_classes
    torch.manual_seed(seed)
    model = factory.subnet_model(
        spec.space,
        spec.backbone,
        subnet,
        data[fit],
        full_finetune=bool(task.get("full_finetune")),
        dataset=ds.key,
    ).to(device)
    r = spec.retrain
    rates = tuned(spec, ds.key, retrain_method(spec, label, task["role"], seed))
    cfg = r.train_config(
        lr=rates.lr, weight_decay=rates.weight_decay, seed=seed, module_lr=rates.module_lr
    )
    state_path = out / "state.pt"
    state = load_state(state_path)
    tracker = tracker_for(spec)
    g = spec.space.geometry
    group = dataset_group(spec, ds)
    tags = {**base_tags(spec, "retrain", ds, seed), "label": label, "group": group or ""}
    run_id = tracker.run(
        f"retrain {ds.key} seed {seed} {label}",
        tags,
        params={
            **cfg.to_dict(),
            **subnet_params_flat(subnet.to_data()),
            "subnet": "full fine-tuning" if task.get("full_finetune") else str(subnet),
            "role": task["role"],
            **split_params(data[fit], data["test"]),
            **data_params(data[fit], data["test"]),
        },
    )
    mean, std = spec.backbone.normalisation()
    started = time.time()

    def on_epoch(epoch: int, metrics: dict[str, float], get_state) -> None:
        tracker.log_metrics(run_id, metrics, step=epoch)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".state.{os.getpid()}.tmp"
        torch.save(get_state(), tmp)
        os.replace(tmp, state_path)
        report(
            {
                "stage": "retrain",
                "dataset": ds.key,
                "seed": seed,
                "label": label,
                "epoch": epoch,
                "epochs": cfg.epochs,
                **metrics,
                "eta_s": eta_s(
                    started, epoch - (state["epoch"] if state else 0), cfg.epochs - epoch
                ),
            }
        )

    if model.trainable_parameters():  # an empty subnet on CLIP is zero-shot: nothing trains
        train(model, data[fit], cfg, mean=mean, std=std, state=state, on_epoch=on_epoch)
    test_acc = evaluate(model, data["test"], mean=mean, std=std)  # once, at the end
    model.save(out / "model")
    result = {
        "dataset": ds.key,
        "seed": seed,
        "label": label,
        "group": group,
        "role": task["role"],
        "subnet": subnet.to_data(),
        "subnet_str": "full fine-tuning" if task.get("full_finetune") else str(subnet),
        "val_acc": task.get("val_acc"),
        "test_acc": test_acc,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "train_split": fit,
        "train_images": len(data[fit]),
        "params": model.num_params()["modules"],
        "head_params": factory.head_params(spec.backbone, num_classes),
        "added_flops": added_flops(subnet, g),
        "mlflow_run_id": run_id,
        "node": task.get("node"),
    }
    final = {"test_acc": test_acc, "params": result["params"], "added_flops": result["added_flops"]}
    if task.get("val_acc") is not None:
        final["val_acc"] = task["val_acc"]
    tracker.log_metrics(run_id, final)
    tracker.log_artifact(run_id, out / "model", "model")
    return finish(tracker, run_id, out, result)
