"""What every stage's trial shares: the spec and dataset a task names, its splits, its
device, its MLflow tracker and tags, and how a trial ends. Nothing here knows about Ray: a trial
reports progress through a ``Report`` callback."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from nas.data.decode import DecodedSplit, decode_split
from nas.data.formats import dataset_format
from nas.data.lists import DataError, Split, read_target
from nas.pipeline.layout import output_id, save_state
from nas.pipeline.progress import EpochProgress, Report
from nas.pipeline.tasks import Task
from nas.spec.datasets import DatasetSpec
from nas.spec.experiment import ExperimentSpec, load_spec
from nas.tracking.runs import Tracker
from nas.training import sampling
from nas.training.train import SupernetSteps


def dataset_root(spec: ExperimentSpec, ds: DatasetSpec) -> Path:
    """The folder holding the dataset's folder: the spec's root, or its format's default."""
    return Path(ds.root) if ds.root else dataset_format(ds.format).default_root(spec.output)


def read_splits(spec: ExperimentSpec, ds: DatasetSpec) -> dict[str, Split]:
    """The dataset's splits as lists of (image, label) entries, nothing decoded."""
    splits = dataset_format(ds.format).read_splits(
        dataset_root(spec, ds) / ds.name,
        shots=ds.shots,
        split_seed=ds.split_seed,
        duplicates=ds.duplicates,
    )
    if ds.test_split != "test":  # the development test split stands in for test
        if ds.test_split not in splits:
            raise DataError(
                f"{dataset_root(spec, ds) / ds.name}: no {ds.test_split} split (test_split of "
                f"dataset {ds.key}); prepare the task again with this version"
            )
        splits["test"] = splits[ds.test_split]
    return splits


def target_splits(
    spec: ExperimentSpec, ds: DatasetSpec, source: Split | DecodedSplit
) -> dict[str, Split]:
    """The dataset's domain-generalisation targets, read in the label space of ``source``
    (a split of the dataset): a named list, or the dataset folder's ``targets/<name>.txt``."""

    folder = dataset_root(spec, ds) / ds.name
    out = {}
    for t in ds.targets:
        listed = Path(t.list) if t.list else folder / "targets" / f"{t.name}.txt"
        root = Path(t.root) if t.root else folder
        if t.list is None and not listed.is_file():
            hint = (
                f"; prepared before mini-VTAB shipped targets, or with a --test-size that left "
                f"no images for them: prepare it again (nas data prepare mini-vtab --out "
                f"NEW_FOLDER --tasks {ds.name})"
                if not dataset_format(ds.format).needs_root
                else ""
            )
            raise DataError(
                f"{listed}: target list not found (target {t.name!r} of dataset {ds.key} is "
                f"named without a list: its folder's targets/{t.name}.txt{hint})"
            )
        out[t.name] = read_target(
            listed, root, t.name, source.num_classes, source.class_names, duplicates=ds.duplicates
        )
    return out


def load_splits(
    spec: ExperimentSpec, ds: DatasetSpec, names: tuple[str, ...]
) -> dict[str, DecodedSplit]:
    """Decoded splits at the backbone's input size (cached under <output>/cache)."""
    splits = read_splits(spec, ds)
    g = spec.backbone.geometry()
    size = g.image_size
    return {n: decode_split(splits[n], size, g.in_chans, spec.output / "cache") for n in names}


def data_params(*splits: DecodedSplit) -> dict[str, str]:
    """The content hashes of the decoded splits a run trains or scores on, as MLflow params
    (``data.<split>.sha256``): every run records exactly which pixels and labels it saw."""
    return {f"data.{split.name}.sha256": split.content_hash() for split in splits}


def dataset_input(dataset: str, split: DecodedSplit, digest: str | None = None):
    """The split as an MLflow dataset input (the runs table's Datasets column): named
    ``<dataset>/<split>``, its content hash as digest, its list file as source, the split as
    context."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    digest = digest or split.content_hash()
    profile = {"num_rows": len(split), "num_classes": split.num_classes}
    return DatasetInput(
        Dataset(
            name=f"{dataset}/{split.name}",
            digest=digest[:16],
            source_type="local",
            source=json.dumps({"uri": str(split.source)}),
            profile=json.dumps(profile),
        ),
        tags=[InputTag("mlflow.data.context", split.name)],
    )


def log_datasets(tracker: Tracker, run_id: str, dataset: str, *splits: DecodedSplit) -> None:
    """Record the splits a run trained or scored on as its MLflow dataset inputs."""
    tracker.client.log_inputs(run_id, datasets=[dataset_input(dataset, s) for s in splits])


@contextlib.contextmanager
def system_metrics(spec: ExperimentSpec, run_id: str, interval_s: float = 5.0) -> Iterator[None]:
    """MLflow's own system metrics logged to ``run_id`` while the block runs (``system/...``:
    CPU, memory, disk, network, and each GPU where ``nvidia-ml-py`` is installed)."""
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines
    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=interval_s, resume_logging=True, tracking_uri=spec.tracking_uri
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def split_params(fit: DecodedSplit, scored: DecodedSplit) -> dict[str, Any]:
    """Which split a run trained on, on how many images, and which split scored it (MLflow
    params ``train_split``, ``train_images``, ``eval_split``)."""
    return {"train_split": fit.name, "train_images": len(fit), "eval_split": scored.name}


def dataset_group(spec: ExperimentSpec, ds: DatasetSpec) -> str | None:
    """The VTAB group (natural / specialized / structured) of a dataset, when known."""
    return dataset_format(ds.format).group(dataset_root(spec, ds), ds.name)


def device_for(spec: ExperimentSpec) -> torch.device:
    return torch.device("cuda" if spec.gpus > 0 and torch.cuda.is_available() else "cpu")


def tracker_for(spec: ExperimentSpec) -> Tracker:
    """The spec's experiment; every run it creates is tagged with the output folder that made
    it (``nas.output``, shown in the UI; the lookup uses ``nas.output_id``)."""
    return Tracker(
        spec.tracking_uri,
        spec.mlflow_experiment,
        artifact_location=spec.artifact_location,
        run_tags={"nas.output": str(spec.output.resolve())},
    )


def task_context(task: Task) -> tuple[ExperimentSpec, DatasetSpec, int]:
    """The spec, dataset and seed a task names."""
    path = Path(task.spec)
    if not path.is_file():  # relative to a working directory this process does not share
        path = Path(task.spec_abs)
    spec = load_spec(path, output=task.output)
    ds = next(d for d in spec.datasets if d.key == task.dataset)
    return spec, ds, int(task.seed)


def base_tags(spec: ExperimentSpec, stage: str, ds: DatasetSpec, seed: int) -> dict[str, Any]:
    """The tags a stage's run is found again by: the output folder's id among them, so that
    a run is only ever reopened by the output folder that made it."""
    return {
        "spec_hash": spec.hash(),
        "output_id": output_id(spec.output),
        "stage": stage,
        "dataset": ds.key,
        "seed": seed,
    }


def eta_s(started: float, done: int, left: int) -> float:
    """Seconds left, at the pace of the ``done`` epochs run since ``started``."""
    return (time.time() - started) / max(done, 1) * left


def epoch_hook(
    task: Task,
    stage: str,
    folder: Path,
    *,
    tracker: Tracker,
    run_id: str,
    state: dict[str, Any] | None,
    epochs: int,
    report: Report,
    checkpoint_every: int = 1,
    label: str | None = None,
) -> Callable[[int, dict[str, float], Callable[[], dict[str, Any]]], None]:
    """What a resumable training does after each epoch: its metrics to MLflow, its resume
    state to ``folder``/state.pt every ``checkpoint_every`` epochs and at the last, and an
    ``EpochProgress`` to ``report``. ``state`` is the state it resumed from, if any."""
    first = state["epoch"] if state else 0
    started = time.time()

    def on_epoch(epoch: int, metrics: dict[str, float], get_state) -> None:
        tracker.log_metrics(run_id, metrics, step=epoch)
        if epoch % checkpoint_every == 0 or epoch == epochs:
            save_state(folder / "state.pt", get_state())
        report(
            EpochProgress(
                stage,
                task.dataset,
                task.seed,
                label=label,
                eta_s=eta_s(started, epoch - first, epochs - epoch),
                epoch=epoch,
                epochs=epochs,
                metrics=metrics,
            )
        )

    return on_epoch


def supernet_steps(spec: ExperimentSpec) -> SupernetSteps:
    """What each supernet training step trains, as the supernet stage's settings say."""
    named = spec.retrain.subnet_baselines().values()
    return sampling.supernet_steps(spec.space, spec.supernet, named)
