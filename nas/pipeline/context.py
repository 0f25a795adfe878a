"""What every stage's trial shares: the spec and dataset a task names, its splits, its
device, its MLflow tracker and tags, and how a trial ends. Nothing here knows about Ray: a trial
reports progress through a ``Report`` callback."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nas import sampling
from nas.data.decode import DecodedSplit, decode_split
from nas.data.formats import Split, read_few_shot, read_image_folder, read_vtab
from nas.pipeline.layout import (
    read_json,
    write_json,
)
from nas.spec import DatasetSpec, ExperimentSpec, load_spec
from nas.tracking import Tracker
from trainers.train import SupernetSteps

Report = Callable[[dict[str, Any]], None]


def dataset_root(spec: ExperimentSpec, ds: DatasetSpec) -> Path:
    if ds.format == "mini-vtab":
        return Path(ds.root) if ds.root else spec.output / "data" / "mini-vtab"
    return Path(ds.root)


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


def load_splits(
    spec: ExperimentSpec, ds: DatasetSpec, names: tuple[str, ...]
) -> dict[str, DecodedSplit]:
    """Decoded splits at the backbone's input size (cached under <output>/cache)."""
    splits = read_splits(spec, ds)
    g = spec.backbone.geometry()
    size = g.patch_size * round(g.num_patches**0.5)  # square inputs
    return {n: decode_split(splits[n], size, g.in_chans, spec.output / "cache") for n in names}


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


def eta_s(started: float, done: int, left: int) -> float:
    """Seconds left, at the pace of the ``done`` epochs run since ``started``."""
    return (time.time() - started) / max(done, 1) * left


def finish(tracker: Tracker, run_id: str, out: Path, result: dict[str, Any]) -> dict[str, Any]:
    """End a trial's work: its MLflow run finished first, then ``done.json``, so that a stop in
    between redoes this end on the rerun instead of leaving the run unfinished for good."""
    tracker.finish(run_id)
    write_json(out / "done.json", result)
    return result


def supernet_steps(spec: ExperimentSpec) -> SupernetSteps:
    """What each supernet training step trains, as the supernet stage's settings say."""
    return sampling.supernet_steps(spec.space, spec.supernet)
