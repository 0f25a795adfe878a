"""What ``nas run`` shows while it runs: one live view in a terminal, timestamped lines elsewhere.

A trial reports a ``Progress`` to Tune (``to_result``: its numbers, and the whole progress as one
JSON string that Tune's loggers keep but do not plot); a Tune callback on the driver reads it
back (``from_result``) into a ``ConsoleView``, which knows the latest progress of every trial of
a stage and renders it as text. In a terminal the view is drawn by rich and redrawn in place
(anything else printed meanwhile, a warning, scrolls above it); when the output is a file or a
pipe (``ray job logs``), every progress and every trial's end is one timestamped line instead.

Ray Tune's own console output (its status tables, its TensorBoard hint, the ``(_trainable
pid=...)`` prefixes) and MLflow's "View run" lines are turned off by ``quiet_environment``,
which ``nas run`` calls before Ray is imported; warnings and errors still come through.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from nas.core.errors import NasError
from nas.pipeline import progress as progress_kinds
from nas.pipeline.progress import Progress
from nas.pipeline.tasks import task_from_config

#: Where ``--progress`` / NAS_PROGRESS choose between the two outputs.
MODES = ("auto", "live", "plain")

#: Environment that keeps Ray's and MLflow's console output to warnings and errors. Read when
#: Ray is imported (the worker prefix) or when a Tune run starts (its output engine).
QUIET_ENV = {
    "RAY_AIR_NEW_OUTPUT": "0",  # Tune's status tables and hints (at verbose=0: nothing)
    "RAY_DISABLE_WORKER_LOG_PREFIX": "1",  # "(_trainable pid=...)" before worker output
    "RAY_COLOR_PREFIX": "0",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # "🏃 View run ... at: ..."
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # "INFO mlflow.store.db.utils: Updating database tables"
}


def quiet_environment() -> None:
    """Set QUIET_ENV where the user has not set these variables themselves."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def quiet_worker() -> None:
    """In a trial's process (which a cluster's raylet started, without the driver's
    environment): MLflow's run links and INFO lines stay out of the job's log."""
    for key in ("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "MLFLOW_LOGGING_LEVEL"):
        os.environ.setdefault(key, QUIET_ENV[key])  # read per call; and by processes it starts
    logging.getLogger("mlflow").setLevel(logging.WARNING)


def choose_mode(mode: str | None = None, stream: TextIO | None = None) -> str:
    """``live`` or ``plain``: the mode asked for (``--progress``, else NAS_PROGRESS), where
    ``auto`` (the default) means live exactly when the output is a terminal."""
    mode = mode or os.environ.get("NAS_PROGRESS") or "auto"
    if mode not in MODES:
        raise NasError(f"NAS_PROGRESS={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "auto":
        stream = stream or sys.stdout
        return "live" if stream.isatty() else "plain"
    return mode


def stamp(now: float | None = None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))


def say(text: str) -> None:
    """A line of the run's own (a stage starts, a stage took so long): timestamped in plain
    mode, as it is in a terminal (where the live view shows the time)."""
    line = f"{stamp()} {text}" if choose_mode() == "plain" else text
    print(line, flush=True)


def to_result(progress: Progress) -> dict[str, Any]:
    """What a trial reports to Tune: the progress's numbers and the progress itself."""
    whole = {"kind": type(progress).__name__, **dataclasses.asdict(progress)}
    return {**progress.numbers(), "progress": json.dumps(whole)}


def from_result(result: dict[str, Any]) -> Progress | None:
    """The progress a Tune result carries (None for a trial's final result)."""
    text = result.get("progress")
    if not isinstance(text, str):
        return None
    fields = json.loads(text)
    kind = getattr(progress_kinds, fields.pop("kind"), None)
    if not (isinstance(kind, type) and issubclass(kind, Progress)):
        return None
    return kind(**fields)


@dataclasses.dataclass
class TrialState:
    name: str  # the task in words, until the first progress names it better
    started: float
    progress: Progress | None = None
    at: float = 0.0  # when the progress came
    ended: str | None = None  # "done" or "failed"

    def eta(self, now: float) -> float | None:
        """The seconds left as of ``now`` (the report's estimate, counted down since)."""
        if self.progress is None or self.progress.eta_s is None:
            return None
        return max(0.0, self.progress.eta_s - (now - self.at))


class ConsoleView:
    """The latest progress of every trial of one stage, as text (``render``)."""

    def __init__(self, stage: str, total: int) -> None:
        self.stage, self.total = stage, total
        self.trials: dict[str, TrialState] = {}
        self.durations: list[float] = []

    def start(self, trial: str, name: str, now: float) -> None:
        state = self.trials.get(trial)
        if state is None or state.ended:  # a retry starts the trial again
            self.trials[trial] = TrialState(name=name, started=now)

    def update(self, trial: str, progress: Progress, now: float) -> None:
        state = self.trials.setdefault(trial, TrialState(name=progress.head(), started=now))
        state.progress, state.at = progress, now

    def end(self, trial: str, now: float, failed: bool = False) -> TrialState:
        state = self.trials.setdefault(trial, TrialState(name=trial, started=now))
        state.ended = "failed" if failed else "done"
        if not failed:
            self.durations.append(now - state.started)
        return state

    def running(self) -> list[TrialState]:
        return [s for s in self.trials.values() if s.ended is None]

    def waiting(self) -> int:
        return self.total - len(self.trials)

    def seconds_left(self, now: float) -> float | None:
        """The longest time left of a running trial, plus the waiting trials' share of the
        workers at the mean duration of those done; None until it can be told."""
        running = self.running()
        etas = [eta for s in running if (eta := s.eta(now)) is not None]
        waiting = self.total - len(self.trials)
        if waiting > 0:
            if not self.durations:
                return None
            mean = sum(self.durations) / len(self.durations)
            slots = max(1, len(running))
            return (max(etas) if etas else 0.0) + mean * -(-waiting // slots)
        return max(etas) if etas else None

    def totals(self, now: float) -> str:
        ended = [s.ended for s in self.trials.values()]
        done, failed = ended.count("done"), ended.count("failed")
        running = ended.count(None)
        waiting = self.total - len(self.trials)
        parts = [f"{done} done", f"{running} running"]
        if failed:
            parts.append(f"{failed} failed")
        parts.append(f"{waiting} waiting")
        left = self.seconds_left(now)
        tail = f", ~{left:.0f} s left" if left is not None else ""
        return f"{self.stage}: {self.total} trials, " + ", ".join(parts) + tail

    def line(self, state: TrialState, now: float) -> str:
        if state.progress is None:
            return f"[{state.name}] starting ({now - state.started:.0f} s)"
        return dataclasses.replace(state.progress, eta_s=state.eta(now)).line()

    def render(self, now: float) -> list[str]:
        """A line per running trial, then the stage's totals."""
        lines = [self.line(s, now) for s in self.running()]
        return [*lines, self.totals(now)]


class Console:
    """Feeds a ConsoleView from Tune's callbacks and shows it: redrawn in place (``live``) or
    as a timestamped line per event (``plain``), on ``stream`` (stdout by default)."""

    def __init__(self, stage: str, total: int, mode: str, stream: TextIO | None = None) -> None:
        self.view = ConsoleView(stage, total)
        self.mode, self.stream = mode, stream
        self.live: Any = None
        self.views: dict[int, ConsoleView] = {}  # each step's, by its index
        self.view_of: dict[str, ConsoleView] = {}  # each trial's step's view

    def begin(self, key: int, stage: str, total: int) -> None:
        """A dataset's trials of a stage (``key``: its step) begin: the stage's view counts
        them, and the screen shows every stage that has trials running or waiting."""
        view = self.views.get(key)
        if view is None:
            self.views[key] = view = ConsoleView(stage, 0)
        view.total += total
        self.view = view
        self.refresh()

    def _view(self, trial: str, key: int | None = None) -> ConsoleView:
        if trial not in self.view_of:
            self.view_of[trial] = self.views.get(key, self.view) if key is not None else self.view
        return self.view_of[trial]

    def out(self) -> TextIO:
        return self.stream or sys.stdout

    def plain(self, text: str, now: float) -> None:
        if self.mode == "plain":
            print(f"{stamp(now)} {text}", file=self.out(), flush=True)

    def refresh(self) -> None:
        if self.live is not None:
            self.live.update(self.renderable(), refresh=True)

    def renderable(self) -> Any:
        from rich.text import Text

        now = time.time()
        active = [v for _, v in sorted(self.views.items()) if v.running() or v.waiting()]
        lines = [line for view in active or [self.view] for line in view.render(now)]
        return Text("\n".join([f"{stamp()}  nas run", *lines]))

    def started(self, trial: str, name: str, key: int | None = None) -> None:
        """A trial (of step ``key``) starts."""
        self._view(trial, key).start(trial, name, time.time())
        self.refresh()

    def reported(self, trial: str, result: dict[str, Any]) -> None:
        progress = from_result(result)
        if progress is None:
            return
        now = time.time()
        self._view(trial).update(trial, progress, now)
        self.plain(progress.line(), now)
        self.refresh()

    def ended(self, trial: str, failed: bool = False) -> None:
        now = time.time()
        view = self._view(trial)
        state = view.end(trial, now, failed)
        name = state.progress.head() if state.progress is not None else state.name
        word = "failed" if failed else "done"
        self.plain(f"{name} {word} after {now - state.started:.0f} s; {view.totals(now)}", now)
        self.refresh()

    @contextlib.contextmanager
    def showing(self) -> Iterator[Console]:
        """While the stage runs: the live view on screen (gone when it ends, as the stage's
        summary line follows), or nothing to set up in plain mode."""
        if self.mode != "live":
            yield self
            return
        from rich.console import Console as RichConsole
        from rich.live import Live

        # a stream handed in (a test's) is drawn on as a terminal; stdout as rich finds it
        force = True if self.stream is not None else None
        console = RichConsole(file=self.out(), force_terminal=force)
        with Live(
            self.renderable(),
            console=console,
            refresh_per_second=2,
            transient=True,
            redirect_stdout=True,
            redirect_stderr=True,
            get_renderable=self.renderable,
        ) as live:
            self.live = live
            try:
                yield self
            finally:
                self.live = None


def tune_callback(console: Console) -> Any:
    """A Ray Tune callback that feeds ``console`` (made here, so that this module does not
    import Ray)."""
    from ray.tune import Callback

    class ConsoleCallback(Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            task = task_from_config(trial.config["task"])
            console.started(trial.trial_id, task.describe(), trial.config.get("step"))

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            console.reported(trial.trial_id, result)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            console.ended(trial.trial_id)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            console.ended(trial.trial_id, failed=True)

    return ConsoleCallback()
