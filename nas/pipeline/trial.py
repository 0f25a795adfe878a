"""The set-up every stage's trial shares (``Trial``): the spec, dataset and seed a task names,
its folder and done marker, the seeded model, its MLflow run, a resumable tracked training, and
the end (MLflow run finished, then the done marker). A stage's ``run`` is a plain function of
its task that uses one; it knows nothing of Ray."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nas.core.jsonio import read_json, write_json
from nas.data.decode import DecodedSplit
from nas.families import build_prompted
from nas.families.prompted import PromptedModel
from nas.pipeline.context import (
    device_for,
    epoch_hook,
    log_datasets,
    system_metrics,
    task_context,
    tracker_for,
)
from nas.pipeline.layout import RunLayout, done_marker, load_state, run_layout
from nas.pipeline.progress import Report
from nas.pipeline.tasks import Task
from nas.space.subnet import Subnet
from nas.spec.datasets import DatasetSpec
from nas.spec.experiment import ExperimentSpec
from nas.tracking.runs import Tracker
from nas.training.train import SupernetSteps, TrainConfig, train


@dataclass
class Trial:
    """One task of a stage, in this process."""

    task: Task
    stage: str  # how its progress events and MLflow runs name the stage
    spec: ExperimentSpec
    ds: DatasetSpec
    seed: int
    folder: Path

    @classmethod
    def of(cls, task: Task, stage: str, folder: Callable[[RunLayout, Task], Path]) -> Trial:
        """The trial of ``task``: its folder is ``folder(layout, task)``."""
        spec, ds, seed = task_context(task)
        return cls(task, stage, spec, ds, seed, folder(run_layout(spec), task))

    def resumes(self) -> bool:
        """Whether the training continues from a state a stop left."""
        return (self.folder / "state.pt").is_file()

    def finished(self) -> dict[str, Any] | None:
        """What the task returned when it finished before (its done marker), or None."""
        marker = done_marker(self.folder)
        return read_json(marker) if marker.is_file() else None

    @functools.cached_property
    def tracker(self) -> Tracker:
        return tracker_for(self.spec)

    def model(
        self,
        split: DecodedSplit,
        subnet: Subnet | None = None,
        *,
        full_finetune: bool = False,
        seeded: bool = True,
    ) -> PromptedModel:
        """The supernet (``subnet`` None) or ``subnet``'s model for the split's classes, on
        the trial's device; built after seeding torch with the task's seed (``seeded``)."""
        if seeded:
            torch.manual_seed(self.seed)
        model = build_prompted(
            self.spec.backbone,
            self.spec.space,
            split,
            subnet=subnet,
            full_finetune=full_finetune,
            dataset=self.ds.key,
        )
        return model.to(device_for(self.spec))

    def track(
        self,
        name: str,
        tags: dict[str, Any],
        params: dict[str, Any],
        description: str,
        splits: tuple[DecodedSplit, ...] = (),
    ) -> str:
        """The trial's MLflow run (found again after a stop), with the splits it saw."""
        run_id = self.tracker.run(name, tags, params=params, description=description)
        log_datasets(self.tracker, run_id, self.ds.key, *splits)
        return run_id

    def fit(
        self,
        model: PromptedModel,
        data: DecodedSplit,
        cfg: TrainConfig,
        run_id: str,
        report: Report,
        *,
        sample_subnet: SupernetSteps | None = None,
        checkpoint_every: int = 1,
        label: str | None = None,
        watch: Callable[[int, dict[str, float]], None] | None = None,
    ) -> dict[str, float]:
        """``train``, resumed from the folder's state.pt, each epoch's metrics to MLflow (and
        to ``watch``) and a checkpoint every ``checkpoint_every`` epochs, the machine's figures
        beside them. Returns the last epoch's metrics (empty: it had finished before)."""
        state = load_state(self.folder / "state.pt")
        mean, std = self.spec.backbone.normalisation()
        on_epoch = epoch_hook(
            self.task,
            self.stage,
            self.folder,
            tracker=self.tracker,
            run_id=run_id,
            state=state,
            epochs=cfg.epochs,
            report=report,
            checkpoint_every=checkpoint_every,
            label=label,
        )
        if watch is not None:
            hook = on_epoch

            def on_epoch(epoch: int, metrics: dict[str, float], get_state) -> None:
                watch(epoch, metrics)
                hook(epoch, metrics, get_state)

        with system_metrics(self.spec, run_id):
            return train(
                model,
                data,
                cfg,
                mean=mean,
                std=std,
                sample_subnet=sample_subnet,
                state=state,
                on_epoch=on_epoch,
            )

    def finish(self, run_id: str, result: dict[str, Any]) -> dict[str, Any]:
        """The end: the MLflow run finished first, then the done marker, so that a stop in
        between redoes the end on the rerun instead of leaving the run unfinished for good."""
        self.tracker.finish(run_id)
        write_json(done_marker(self.folder), result)
        return result
