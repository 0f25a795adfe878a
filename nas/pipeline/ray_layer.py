"""The thin layer between the pipeline and Ray Tune: one Tune run per ``nas run``, one trial per
task of each of its stages (``run_sequence``: the stages in order, as ``sequence.StageSequence``
plans them; a trial's process serves the trials after it, of its stage or the next).

Everything distributed is configuration here (resources per trial, storage path, retries);
the work itself is a plain function of a task dict (the stage modules: ``nas.pipeline.hparams``,
``supernet``, ``search``, ``retrain``). A trial that fails is retried (``max_failures``) and
resumes from its own state in the output folder; one that still fails is reported by name with
its error, never dropped.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import Searcher

from nas.core.errors import NasError
from nas.pipeline.console import (
    Console,
    choose_mode,
    quiet_worker,
    say,
    to_result,
    tune_callback,
)
from nas.pipeline.progress import Progress
from nas.pipeline.sequence import Ended, StageSequence, Step
from nas.pipeline.stage import Halving, Plan
from nas.pipeline.tasks import Task, task_from_config

# Ray's side effects we do not want: usage statistics, and a token file in the home directory.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
}


def auto_address(where: str = "ray.address") -> tuple[str, str]:
    """The HOST:PORT that ``auto`` stands for: the cluster ``ray start`` started on this
    machine, as the address file it leaves in Ray's temp folder names it; and that file.
    Ray's own ``auto`` falls back to any Ray it finds running here, such as another run's
    private one (which ends with that run): not here."""
    from ray._private import utils  # Ray's temp folder and address file: no public API

    listed = utils.get_ray_address_file(None)
    found = utils.read_ray_address(None)
    if not found:
        raise NasError(
            f"{where} 'auto': no cluster was started with `ray start` on this machine (no "
            f"{listed}); start one with `ray start --head`, set ray.address to a head's "
            "HOST:PORT, or leave ray.address out to run on a private local Ray"
        )
    return found, listed


def probe_ray(address: str, where: str = "ray.address", timeout: float = 5.0) -> str:
    """The address to attach to (``auto`` read as ``auto_address`` reads it), once something
    answers there: Ray itself would retry for minutes."""
    if address == "local":
        return address
    stale = ""
    if address == "auto":
        target, listed = auto_address(where)
        stale = f" ({listed} still names it: its head was stopped or killed; `ray stop` clears it)"
    else:
        target = address.split("://", 1)[-1].rstrip("/")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise NasError(
            f"{where} {address!r}: expected HOST:PORT of a running cluster's head "
            "(e.g. 10.0.0.1:6379), ray://HOST:10001, or auto"
        )
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        shown = f"{address!r}" if address == target else f"{address!r} ({target})"
        raise NasError(
            f"{where} {shown}: no Ray cluster answers there ({exc.strerror or exc}){stale}; "
            "start one with `ray start --head`, or leave ray.address out to run on a "
            "private local Ray"
        ) from None
    return target if address == "auto" else address


def ray_started() -> bool:
    """Whether this process is attached to a Ray already."""
    return ray.is_initialized()


def start_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Attach to a cluster (``address``, or RAY_ADDRESS as under ``ray job submit``), or start
    a private local instance. Returns whether this call started Ray (and should stop it)."""
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        target = address or os.environ["RAY_ADDRESS"]
        where = "ray.address" if address else "RAY_ADDRESS"
        target = probe_ray(target, where)
        try:
            ray.init(address=target, log_to_driver=True, logging_level=logging.WARNING)
        except (ConnectionError, ValueError) as exc:
            first = str(exc).splitlines()[0].split(" Please specify")[0]
            raise NasError(
                f"{where} {target!r}: {first} (start one with `ray start --head`, or leave "
                "ray.address out to run on a private local Ray)"
            ) from None
        return False
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=True,
        logging_level=logging.WARNING,  # not "Started a local Ray instance"
        runtime_env={"env_vars": dict(RAY_ENV)},
    )
    return True


def _trainable(config: dict[str, Any], runs: tuple[Callable[..., dict[str, Any]], ...]) -> None:
    """One trial: its step's ``run`` (the steps' runs handed over by ``tune.with_parameters``)
    on the task."""
    quiet_worker()
    # Which node ran the trial, for the record (the stage code itself knows nothing of Ray).
    task = replace(task_from_config(config["task"]), node=ray.get_runtime_context().get_node_id())

    def report(progress: Progress) -> None:
        # The driver's console shows it (nas.pipeline.console): nothing printed here.
        tune.report(to_result(progress))

    result = runs[config["step"]](task, report)
    tune.report(
        {"finished": 1, **{k: v for k, v in (result or {}).items() if isinstance(v, int | float)}}
    )


class GroupedASHA(FIFOScheduler):
    """ASHA within groups of trials: one independent ASHA per value of ``config["task"][key]``,
    so that one Tune run can hold many sweeps (every dataset and method of the hparams stage)
    and keep the cluster busy, while a point is only ever stopped for being worse than points
    of its own sweep. The other arguments are ASHAScheduler's."""

    def __init__(self, key: str, **asha: Any) -> None:
        super().__init__()
        self.key, self.asha = key, asha
        self.groups: dict[str, ASHAScheduler] = {}
        self.group_of: dict[str, str] = {}

    def _of(self, trial: Any) -> ASHAScheduler:
        return self.groups[self.group_of[trial.trial_id]]

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        group = str(trial.config["task"][self.key])
        self.group_of[trial.trial_id] = group
        if group not in self.groups:
            self.groups[group] = ASHAScheduler(**self.asha)
        self.groups[group].on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self._of(trial).on_trial_error(tune_controller, trial)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"Using ASHA within {len(self.groups)} groups of trials (by {self.key})"


def last_error(trial: Any) -> str:
    """The last line of a failed trial's error (its exception), as Tune wrote it."""
    path = Path(trial.error_file) if getattr(trial, "error_file", None) else None
    if path is not None and path.is_file():
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1][:300] if lines else ""
    return ""


class RetryReport(Callback):
    """Says so when Tune retries a failed trial: a retry that hides an error costs time."""

    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        task = task_from_config(trial.config["task"])
        say(
            f"nas: {trial.config['stage']} trial {task.describe()} failed "
            f"(attempt {trial.run_metadata.num_failures} of {self.max_failures + 1}), "
            f"retrying: {last_error(trial)}"
        )


class StepSchedulers(FIFOScheduler):
    """Each step's own scheduler (a step's trials carry its index, ``config["step"]``): ASHA
    on ``val_acc`` within groups (``GroupedASHA``) for a step whose plan asks for successive
    halving (``halving_of``), first in first out otherwise."""

    def __init__(self, halving_of: Callable[[int], Halving | None]) -> None:
        super().__init__()
        self.halving_of = halving_of
        self.by_step: dict[int, GroupedASHA | None] = {}

    def _of(self, trial: Any) -> GroupedASHA | None:
        return self.by_step.get(trial.config["step"])

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        step = trial.config["step"]
        if step not in self.by_step:
            h = self.halving_of(step)
            self.by_step[step] = None
            if h is not None:
                self.by_step[step] = GroupedASHA(
                    "group",
                    metric="val_acc",
                    mode="max",
                    max_t=h.epochs,
                    grace_period=min(h.grace_period, h.epochs),
                    reduction_factor=h.reduction_factor,
                )
        if (own := self._of(trial)) is not None:
            own.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        own = self._of(trial)
        if own is None:
            return super().on_trial_result(tune_controller, trial, result)
        return own.on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        if (own := self._of(trial)) is not None:
            own.on_trial_complete(tune_controller, trial, result)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        if (own := self._of(trial)) is not None:
            own.on_trial_error(tune_controller, trial)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        if (own := self._of(trial)) is not None:
            own.on_trial_remove(tune_controller, trial)


class Sequencer(Searcher):
    """Tune's side of a ``StageSequence``: each trial Tune asks for is the sequence's next task
    (None while the current step's last trials run, FINISHED once it is over)."""

    def __init__(self, sequence: StageSequence) -> None:
        super().__init__()
        self.sequence = sequence

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.sequence.finished():
            return Searcher.FINISHED
        handed = self.sequence.next_task()
        if handed is None:
            return None
        index, step, task = handed
        return {"step": index, "stage": step.stage, "task": task.to_config()}

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        """Nothing: ``SequenceEnds`` hands the end on, with the trial it needs."""

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
        """Nothing to save: a rerun plans again from the files the trials wrote."""


class SequenceEnds(Callback):
    """Hands each trial's end (completed, stopped early, or failed after its retries) to the
    sequence once, after the console has shown it. A trial Tune ends by another path (a reused
    worker that could not be reset) is found at the end of Tune's next step, so that no lane
    waits forever for it. An error of the driver's part (a plan, a group's end) is kept by the
    sequence, never raised into Tune (which would run the finished trial again)."""

    def __init__(self, sequence: StageSequence) -> None:
        self.sequence = sequence
        self.passed: set[str] = set()

    def _ended(self, trial: Any, error: str | None) -> None:
        if trial.trial_id in self.passed:
            return
        self.passed.add(trial.trial_id)
        task = task_from_config(trial.config["task"])
        try:
            self.sequence.ended(trial.config["step"], Ended(task, trial.last_result or {}, error))
        except Exception as exc:  # kept, and raised after the Tune run
            self.sequence.errors.append(exc)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, last_error(trial) or "failed")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        for trial in trials:
            if trial.trial_id not in self.passed and trial.status in ("TERMINATED", "ERROR"):
                why = "its worker could not be reset for it" if trial.status == "ERROR" else None
                self._ended(trial, (last_error(trial) or why) if why else None)


def run_sequence(
    sequence: StageSequence,
    *,
    storage: Path,
    cpus: float,
    gpus: float,
    name: str | None = None,
) -> None:
    """The sequence's steps through one Ray Tune run: one trial per task, each running its
    step's ``run`` (a plain function that knows nothing of Ray), a trial's process reused by
    the trials after it (``reuse_actors``), of its own stage or the next. Raises the
    sequence's errors (failed trials, a plan's) once no trial runs."""
    console = Console("", 0, choose_mode())
    sequence.on_step = lambda index, step, plan: console.begin(index, step.stage, len(plan.tasks))
    name = name or f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    sequence.logs = str(storage / name)
    if not sequence.start():
        sequence.raise_errors()
        return
    runs = tuple(step.run for step in sequence.steps)
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, runs=runs), {"cpu": cpus, "gpu": gpus}
    )

    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            reuse_actors=True,
            search_alg=Sequencer(sequence),
            scheduler=StepSchedulers(sequence.halving.get),
            num_samples=-1,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=tune.FailureConfig(max_failures=sequence.max_failures),
            verbose=0,
            callbacks=[
                RetryReport(sequence.max_failures),
                tune_callback(console),
                SequenceEnds(sequence),
            ],
        ),
    )
    # Tune lets a custom searcher have one pending trial: workers would start one after another
    # (~11 s of imports each). As many as a grid search gets (Tune's rule), unless set.
    cluster_cpus = ray.cluster_resources().get("CPU", 1.0)
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(max(200, int(cluster_cpus * 1.1))))
    # Tune's INFO lines ("Wrote the latest version of all result files ...") are not news.
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    with console.showing():
        try:
            tuner.fit()
        except BaseException as exc:
            sequence.interrupted("stopped" if isinstance(exc, KeyboardInterrupt) else "failed")
            raise
    if not sequence.finished():  # Tune's run ended early (its SIGUSR1 handler, say)
        sequence.interrupted("stopped")
        raise NasError(
            "the Ray Tune run ended before its trials did; run the same command again to "
            "continue them"
        )
    sequence.raise_errors()


def run_stage(
    stage: str,
    run: Callable[..., dict[str, Any]],
    tasks: Sequence[Task],
    *,
    storage: Path,
    cpus: float,
    gpus: float,
    name: str | None = None,
) -> None:
    """One stage's ``run`` on every task (a one-step sequence); NasError if a trial failed."""
    tasks = list(tasks)
    step = Step(stage, stage, lambda lane: Plan(tasks, ""), run)
    run_sequence(StageSequence([step]), storage=storage, cpus=cpus, gpus=gpus, name=name)
