"""The thin layer between the pipeline and Ray Tune: one Tune trial per task of a stage.

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
from typing import TYPE_CHECKING, Any

import ray
from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

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
from nas.pipeline.tasks import Task, task_from_config

if TYPE_CHECKING:
    from nas.pipeline.stage import Plan, Stage

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


def _trainable(config: dict[str, Any], run: Callable[..., dict[str, Any]]) -> None:
    """One trial: the stage's ``run`` (handed over by ``tune.with_parameters``) on the task."""
    quiet_worker()
    # Which node ran the trial, for the record (the stage code itself knows nothing of Ray).
    task = replace(task_from_config(config["task"]), node=ray.get_runtime_context().get_node_id())

    def report(progress: Progress) -> None:
        # The driver's console shows it (nas.pipeline.console): nothing printed here.
        tune.report(to_result(progress))

    result = run(task, report)
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


class GroupEnd(Callback):
    """Calls ``on_group(group, ended)`` as soon as every trial of a group (the trials whose
    task has one value of its field ``key``; ``sizes`` says how many each has) has ended,
    stopped early by a scheduler or not; ``ended`` holds each trial's task and last result."""

    def __init__(
        self,
        key: str,
        sizes: dict[str, int],
        on_group: Callable[[str, list[tuple[Any, dict[str, Any]]]], None],
    ) -> None:
        self.key, self.sizes, self.on_group = key, sizes, on_group
        self.ended: dict[str, list[tuple[Task, dict[str, Any]]]] = {}

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        task = task_from_config(trial.config["task"])
        group = str(getattr(task, self.key))
        ended = self.ended.setdefault(group, [])
        ended.append((task, trial.last_result or {}))
        if len(ended) == self.sizes[group]:
            self.on_group(group, ended)


def describe_task(config: dict[str, Any]) -> str:
    """A trial's task in words, from the config Tune holds."""
    return task_from_config(config).describe()


class RetryReport(Callback):
    """Says so when a trial failed and Tune retries it: a retry is for a fault, and one that
    hides an error costs an attempt and the time it ran."""

    def __init__(self, stage: str, max_failures: int) -> None:
        self.stage, self.max_failures = stage, max_failures

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = ""
        path = Path(trial.error_file) if getattr(trial, "error_file", None) else None
        if path is not None and path.is_file():
            lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
            error = lines[-1][:300] if lines else ""
        say(
            f"nas: {self.stage} trial {describe_task(trial.config['task'])} failed "
            f"(attempt {trial.run_metadata.num_failures} of {self.max_failures + 1}), "
            f"retrying: {error}"
        )


def launch(stage: Stage, plan: Plan, *, storage: Path, cpus: float, gpus: float) -> None:
    """A stage's plan through Ray Tune: one trial per task, running ``stage.run``. Where the
    plan asks for successive halving: ASHA on ``val_acc`` within each group of trials (their
    tasks' ``group``: ``GroupedASHA``), and ``plan.on_group`` called as each group ends
    (``GroupEnd``)."""
    halving, scheduler, callbacks = plan.halving, None, []
    if halving is not None:
        scheduler = GroupedASHA(
            "group",
            metric="val_acc",
            mode="max",
            max_t=halving.epochs,
            grace_period=min(halving.grace_period, halving.epochs),
            reduction_factor=halving.reduction_factor,
        )
        callbacks = [GroupEnd("group", plan.sizes, plan.on_group)]
    run_stage(
        stage.name,
        stage.run,
        plan.tasks,
        storage=storage,
        cpus=cpus,
        gpus=gpus,
        scheduler=scheduler,
        callbacks=callbacks,
    )


def run_stage(
    stage: str,
    run: Callable[..., dict[str, Any]],
    tasks: Sequence[Task],
    *,
    storage: Path,
    cpus: float,
    gpus: float,
    max_failures: int = 2,
    scheduler: Any = None,
    name: str | None = None,
    callbacks: Sequence[Any] = (),
) -> list[Any]:
    """Run the stage's work (``run(task, report)``, a plain function that knows nothing of
    Ray) on every task, one Tune trial each; NasError if any failed. ``stage`` names the
    trials and their console."""
    if not tasks:
        return []
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, run=run), {"cpu": cpus, "gpu": gpus}
    )
    console = Console(stage, len(tasks), choose_mode())
    tuner = tune.Tuner(
        trainable,
        param_space={"stage": stage, "task": tune.grid_search([t.to_config() for t in tasks])},
        tune_config=tune.TuneConfig(reuse_actors=True, scheduler=scheduler),
        run_config=tune.RunConfig(
            name=name or f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(storage),
            failure_config=tune.FailureConfig(max_failures=max_failures),
            verbose=0,
            callbacks=[RetryReport(stage, max_failures), tune_callback(console), *callbacks],
        ),
    )
    # Tune's INFO lines ("Wrote the latest version of all result files ...") are not news.
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    with console.showing():
        results = tuner.fit()
    failed = [(r.config["task"], r.error) for r in results if r.error is not None]
    if failed:
        lines = [
            f"{describe_task(t)}: {str(err).strip().splitlines()[-1][:300]}" for t, err in failed
        ]
        raise NasError(
            f"{stage}: {len(failed)} trial(s) failed after {max_failures} retries:\n  "
            + "\n  ".join(lines)
            + f"\n(trial logs under {storage / stage})"
        )
    if scheduler is None:  # a scheduler (ASHA) may stop trials early on purpose
        unfinished = [r for r in results if r.error is None and not r.metrics.get("finished")]
        if unfinished:
            raise NasError(
                f"{stage}: {len(unfinished)} trial(s) ended before finishing, without an error "
                "(stopped from outside?); run the same command again to continue them"
            )
    return list(results)
