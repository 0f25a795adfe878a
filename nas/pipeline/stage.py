"""The shape every stage of the pipeline has (data plus a plain function), and the registry
of stages by name.

A stage says which tasks it has for a spec (one Tune trial each), where a task's trial writes
(its ``folder``; the done marker there lets a rerun skip it), and runs one task in a plain
function (``run``) that reports typed progress events (``nas.pipeline.progress``) through a
callback and knows nothing of Ray. ``plan`` says what to run now (per dataset: a lane of
``sequence.StageSequence``); ``ray_layer.run_sequence`` runs it through Ray Tune. Nothing here
imports Ray or torch: the stage modules are imported when a stage is looked up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from nas.core.registry import Registry
from nas.pipeline.layout import RunLayout, done_marker, run_layout
from nas.pipeline.progress import Report
from nas.pipeline.tasks import Task

if TYPE_CHECKING:
    from nas.spec.datasets import DatasetSpec
    from nas.spec.experiment import ExperimentSpec

Pairs = Sequence[tuple["DatasetSpec", int]]


@dataclass(frozen=True)
class Halving:
    """Successive halving (ASHA) on ``val_acc`` within each group of a stage's trials (their
    tasks' ``group``), each trial reporting once per epoch."""

    epochs: int
    grace_period: int
    reduction_factor: int


@dataclass
class Plan:
    """What a stage hands the sequence (``sequence.StageSequence``): the tasks to run now, the
    console line that announces them, and for stages of short scored trials (sweeps,
    verification) successive halving within groups, with ``on_group`` called as each group's
    trials have all ended (``sizes``: how many trials each group has)."""

    tasks: list[Task]
    line: str
    halving: Halving | None = None
    sizes: dict[str, int] = field(default_factory=dict)
    on_group: Callable[[str, list[tuple[Any, dict[str, Any]]]], None] | None = None


class Stage:
    """One stage: ``name`` is how Tune's trials and the run's timings know it."""

    name: ClassVar[str]
    title: ClassVar[str] = ""  # the "== title: ..." line's; the name when empty

    def tasks(self, spec: ExperimentSpec, base: dict[str, str], pairs: Pairs) -> list[Task]:
        """Every task of the stage for the spec's datasets and seeds (``pairs``); ``base``
        says where the spec and the output folder are (``Task``'s first fields)."""
        raise NotImplementedError

    @staticmethod
    def folder(layout: RunLayout, task: Task) -> Path:
        """Where a task's trial writes (its done marker among its files)."""
        raise NotImplementedError

    def done_marker(self, spec: ExperimentSpec, task: Task) -> Path:
        """The file a finished task leaves: a rerun skips the tasks that have one."""
        return done_marker(self.folder(run_layout(spec), task))

    @staticmethod
    def run(task: Any, report: Report = lambda p: None) -> dict[str, Any]:
        """One task, in this process (a Tune trial calls this; so can a test or a benchmark)."""
        raise NotImplementedError

    def plan(self, spec: ExperimentSpec, base: dict[str, str], pairs: Pairs) -> Plan:
        """What the Ray layer runs of this stage now: its unfinished tasks."""
        tasks = self.tasks(spec, base, pairs)
        todo = [t for t in tasks if not self.done_marker(spec, t).is_file()]
        title = self.title or self.name
        return Plan(todo, f"== {title}: {len(todo)} of {len(tasks)} trials to run")


#: Where each stage lives, imported on first use.
STAGES: Registry[type[Stage]] = Registry(
    "stage",
    {
        "hparams": "nas.pipeline.hparams:Hparams",
        "supernet": "nas.pipeline.supernet:Supernet",
        "search": "nas.pipeline.subnet_search:Search",
        "supernet+search": "nas.pipeline.subnet_search:SupernetAndSearch",
        "verify": "nas.pipeline.verify:Verify",
        "retrain": "nas.pipeline.retrain:Retrain",
    },
)


def stage(name: str) -> type[Stage]:
    """The stage class of a name (importing its module the first time)."""
    return STAGES[name]
