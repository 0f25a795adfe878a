"""The stages of one ``nas run`` as one stream of trials (``StageSequence``), so that one Tune run
holds them all and a trial's process, with torch, timm and MLflow imported, serves the trials
after it, of its own stage or of the next (a stage used to be a Tune run of its own that started
its workers afresh: about 17 s of imports and set-up per stage on 2 cores).

Each dataset goes through the stages on its own lane: its next stage is planned (``Step.plan``,
which reads what its stages before wrote) as soon as every trial of its current stage has ended,
without waiting for the other datasets, so a dataset's retraining may run beside another's
search. Within a stage of short scored trials (``Plan.halving``), each group's ``on_group`` is
called as soon as its trials have all ended, before the lane's next stage is planned. A lane
whose stage has a failed trial (or whose plan fails) stops there; the others go on, and the
errors are raised at the end. A stage's wall time runs from its first lane's plan to its last
lane's end. Nothing here imports Ray: ``ray_layer`` hands the tasks to Tune and their ends back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from nas.core.errors import NasError
from nas.pipeline.console import say
from nas.pipeline.stage import Halving, Plan
from nas.pipeline.tasks import Task


class Timer(Protocol):
    """What records a stage's wall time (``driver.StageTimer``)."""

    def start(self, stage: str) -> None: ...

    def stop(self, stage: str, ended: str) -> None: ...


@dataclass(frozen=True)
class Step:
    """One stage of a run: ``name`` is its timing's (``hparams (searched)``), ``stage`` the
    name its trials and its console carry, ``plan(lane)`` makes one dataset's plan (called once
    the lane's step before has ended), ``run`` is what its trials run (a plain function of a
    task and a report)."""

    name: str
    stage: str
    plan: Callable[[str], Plan]
    run: Callable[..., dict[str, Any]]


@dataclass
class Ended:
    """How a trial ended: its task, its last result, and its error's last line (None: none)."""

    task: Task
    result: dict[str, Any]
    error: str | None = None


@dataclass
class Lane:
    """One dataset's way through the steps: the step it is in, that step's plan, the tasks not
    yet handed out, how many were, and those that ended."""

    key: str
    index: int = -1
    plan: Plan | None = None
    queue: list[Task] = field(default_factory=list)
    handed: int = 0
    done: list[Ended] = field(default_factory=list)
    groups: dict[str, list[tuple[Any, dict[str, Any]]]] = field(default_factory=dict)
    stopped: bool = False  # by a failure

    def running(self) -> int:
        return self.handed - len(self.done) if self.plan is not None else 0


@dataclass
class StageSequence:
    """The steps' trials, each lane (a dataset; ``lanes``) through the steps in order.
    ``next_task`` hands out the next task of the earliest step that has one; ``ended`` takes
    each trial's end. ``errors`` are the failed trials' stages and the plans' errors, raised
    by ``raise_errors`` once no trial runs."""

    steps: Sequence[Step]
    lanes: Sequence[str] = ("",)
    timer: Timer | None = None
    max_failures: int = 2
    logs: str = ""  # where the trials' logs are, for the message of a failed one
    errors: list[BaseException] = field(default_factory=list)
    halving: dict[int, Halving | None] = field(default_factory=dict)  # each planned step's
    on_step: Callable[[int, Step, Plan], None] | None = None  # a lane's step with tasks begins
    _lanes: dict[str, Lane] = field(default_factory=dict)
    _past: dict[int, set[str]] = field(default_factory=dict)  # the lanes past each step
    _failed: set[int] = field(default_factory=set)  # the steps a lane failed in
    _began: set[int] = field(default_factory=set)  # the steps whose wall time is running
    _started: set[int] = field(default_factory=set)  # the steps that ever began

    def start(self) -> bool:
        """Plan each lane's first step that has tasks; whether any lane has one."""
        self._lanes = {key: Lane(key) for key in self.lanes}
        for lane in self._lanes.values():
            self._advance(lane)
        return not self.finished()

    def finished(self) -> bool:
        """Nothing left to hand out and nothing running."""
        return all(lane.plan is None for lane in self._lanes.values())

    def next_task(self) -> tuple[int, Step, Task] | None:
        """The next task of the earliest step that has one (lanes in order), with the step's
        index; None for now."""
        ready = [lane for lane in self._lanes.values() if lane.queue]
        if not ready:
            return None
        lane = min(ready, key=lambda la: la.index)
        lane.handed += 1
        return lane.index, self.steps[lane.index], lane.queue.pop(0)

    def ended(self, index: int, end: Ended) -> None:
        """A trial of step ``index`` ended (completed, stopped early by a scheduler, or failed
        after its retries); its lane's last one plans the lane's next step."""
        lane = self._lanes.get(self._lane_of(end.task))
        if lane is None or lane.plan is None or lane.index != index:
            return  # nothing of this sequence's (a late report)
        lane.done.append(end)
        plan = lane.plan
        if plan.halving is not None and plan.on_group is not None and end.error is None:
            group = str(end.task.group)  # type: ignore[attr-defined]  # halving tasks have one
            members = lane.groups.setdefault(group, [])
            members.append((end.task, end.result))
            if len(members) == plan.sizes.get(group, -1):
                self._guard(lane, lambda: plan.on_group(group, members))
        if lane.running() > 0 or lane.queue:
            return
        if (problem := self._problem(lane)) is not None:
            self._stop_lane(lane, problem)
        self._leave(lane)
        self._advance(lane)

    def interrupted(self, ended: str = "stopped") -> None:
        """The run was stopped (Ctrl-C, SIGTERM) or failed: every stage begun and not ended
        is recorded so (``ended``), and nothing more is handed out."""
        if self.timer is not None:
            for index in sorted(self._began):
                self.timer.stop(self.steps[index].name, ended)
        self._began.clear()
        for lane in self._lanes.values():
            lane.plan, lane.queue = None, []

    def raise_errors(self) -> None:
        """Raise what went wrong: the failed stages' errors as one, or else (an error that is
        not one of ours: a bug) the first such, as it was, the others said before it."""
        if not self.errors:
            return
        ours = [e for e in self.errors if isinstance(e, NasError)]
        if len(ours) == len(self.errors):
            raise ours[0] if len(ours) == 1 else NasError("\n".join(map(str, ours)))
        for error in ours:
            say(f"nas: error: {error}")
        raise next(e for e in self.errors if not isinstance(e, NasError))

    def _stop_lane(self, lane: Lane, error: BaseException) -> None:
        """A lane's stage failed: said at once (the other datasets go on), raised at the end."""
        self.errors.append(error)
        lane.stopped, lane.queue = True, []
        if len(self._lanes) > 1:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
            say(f"nas: {lane.key} stops here ({first}); the other datasets go on")

    def _lane_of(self, task: Task) -> str:
        return task.dataset if task.dataset in self._lanes else next(iter(self._lanes))

    def _problem(self, lane: Lane) -> NasError | None:
        step = self.steps[lane.index]
        failed = [e for e in lane.done if e.error is not None]
        if failed:
            lines = [f"{e.task.describe()}: {e.error}" for e in failed]
            return NasError(
                f"{step.stage}: {len(failed)} trial(s) failed after {self.max_failures} "
                "retries:\n  "
                + "\n  ".join(lines)
                + (f"\n(trial logs under {self.logs})" if self.logs else "")
            )
        if lane.plan is not None and lane.plan.halving is None:  # halving stops on purpose
            unfinished = [e for e in lane.done if not e.result.get("finished")]
            if unfinished:
                return NasError(
                    f"{step.stage}: {len(unfinished)} trial(s) ended before finishing, without "
                    "an error (stopped from outside?); run the same command again to continue "
                    "them"
                )
        return None

    def _guard(self, lane: Lane, call: Callable[[], Any]) -> None:
        """Run the driver's part of a lane's step (its plan, a group's end); an error in it
        stops the lane and is raised once the trials still running have ended."""
        try:
            call()
        except Exception as exc:  # kept, and raised after the Tune run
            self._stop_lane(lane, exc)

    def _leave(self, lane: Lane) -> None:
        """The lane's current step is over for it (finished, skipped, or failed)."""
        if lane.index >= 0:
            self._past_step(lane, lane.index, failed=lane.stopped)
        lane.plan, lane.queue, lane.handed, lane.done, lane.groups = None, [], 0, [], {}

    def _past_step(self, lane: Lane, index: int, failed: bool = False) -> None:
        """The lane is past step ``index`` (``failed`` in it); the step's wall time ends with
        its last lane."""
        if failed:
            self._failed.add(index)
        past = self._past.setdefault(index, set())
        past.add(lane.key)
        if len(past) == len(self._lanes) and index in self._began and self.timer is not None:
            self.timer.stop(
                self.steps[index].name, "failed" if index in self._failed else "finished"
            )
            self._began.discard(index)

    def _advance(self, lane: Lane) -> None:
        """Plan the lane's steps after its current one until one has tasks, or none is left
        (a stopped lane is past every later step)."""
        while lane.index + 1 < len(self.steps):
            lane.index += 1
            step = self.steps[lane.index]
            if lane.stopped:
                self._past_step(lane, lane.index)
                continue
            if lane.index not in self._started:
                self._started.add(lane.index)
                self._began.add(lane.index)
                if self.timer is not None:
                    self.timer.start(step.name)
            plans: list[Plan] = []
            self._guard(lane, lambda: plans.append(step.plan(lane.key)))  # noqa: B023
            if plans and plans[0].line:
                say(plans[0].line + (f" ({lane.key})" if len(self._lanes) > 1 else ""))
            if plans and plans[0].tasks:
                lane.plan, lane.queue = plans[0], list(plans[0].tasks)
                self.halving[lane.index] = lane.plan.halving
                if self.on_step is not None:
                    self.on_step(lane.index, step, lane.plan)
                return
            self._leave(lane)
