"""The shape every stage of the pipeline has, and where the Ray layer finds a stage by name.

A stage says which tasks it has for a spec (one Tune trial each), where a task's done-marker
lies (a rerun skips the tasks that have one), and runs one task in a plain function that reports
typed progress events (``nas.pipeline.progress``) through a callback; ``launch`` runs a stage's
unfinished tasks through Ray Tune. Nothing here imports Ray or torch: the stage modules are
imported when a stage is looked up.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from nas.pipeline.console import say
from nas.pipeline.progress import Report
from nas.pipeline.tasks import Task
from nas.registry import Registry

if TYPE_CHECKING:
    from nas.spec import DatasetSpec, ExperimentSpec

Pairs = Sequence[tuple["DatasetSpec", int]]


class Stage:
    """One stage: ``name`` is how Tune's trials and the run's timings know it."""

    name: ClassVar[str]
    title: ClassVar[str] = ""  # the "== title: ..." line's; the name when empty

    def tasks(self, spec: ExperimentSpec, base: dict[str, str], pairs: Pairs) -> list[Task]:
        """Every task of the stage for the spec's datasets and seeds (``pairs``); ``base``
        says where the spec and the output folder are (``Task``'s first fields)."""
        raise NotImplementedError

    def done_marker(self, spec: ExperimentSpec, task: Task) -> Path:
        """The file a finished task leaves: a rerun skips the tasks that have one."""
        raise NotImplementedError

    @staticmethod
    def run(task: Any, report: Report = lambda p: None) -> dict[str, Any]:
        """One task, in this process (a Tune trial calls this; so can a test or a benchmark)."""
        raise NotImplementedError

    def launch(self, spec: ExperimentSpec, base: dict[str, str], pairs: Pairs) -> None:
        """The stage's unfinished tasks, one Tune trial each, on the spec's resources."""
        from nas.pipeline.layout import run_layout
        from nas.pipeline.ray_layer import run_stage

        tasks = self.tasks(spec, base, pairs)
        todo = [t for t in tasks if not self.done_marker(spec, t).is_file()]
        title = self.title or self.name
        say(f"== {title}: {len(todo)} of {len(tasks)} trials to run")
        run_stage(
            self.name, self.run, todo, storage=run_layout(spec).ray, cpus=spec.cpus, gpus=spec.gpus
        )


#: Where each stage lives, imported on first use.
STAGES: Registry[type[Stage]] = Registry(
    "stage",
    {
        "hparams": "nas.pipeline.hparams:Hparams",
        "supernet": "nas.pipeline.supernet:Supernet",
        "search": "nas.pipeline.search:Search",
        "supernet+search": "nas.pipeline.search:SupernetAndSearch",
        "verify": "nas.pipeline.verify:Verify",
        "retrain": "nas.pipeline.retrain:Retrain",
    },
)


def stage(name: str) -> type[Stage]:
    """The stage class of a name (importing its module the first time)."""
    return STAGES[name]
