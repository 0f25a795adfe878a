"""What one trial of a stage runs, as typed records: the spec (how a worker on any node finds
it), the output folder, a dataset and a seed, and what the stage adds (a sweep point's rates, a
retraining's subnet). Tune carries a task as plain data (``to_config``; its trial names, its
``params.json`` and its schedulers read the fields), and a trial rebuilds it
(``task_from_config``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar


@dataclass(frozen=True, kw_only=True)
class Task:
    """A stage's trial for one dataset and seed (the supernet trained, then searched)."""

    kind: ClassVar[str] = "dataset"
    spec: str  # relative to the working directory when inside it (``ray job submit``)
    spec_abs: str  # the same spec, absolute: for a process that does not share that directory
    output: str
    dataset: str
    seed: int
    node: str | None = None  # which node ran it, for the record (set by the Ray layer)

    def describe(self) -> str:
        return f"{self.dataset} seed {self.seed}"

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True, kw_only=True)
class SweepPoint(Task):
    """One point of an hparams sweep: a method (``supernet``, ``baseline-NAME``, or a searched
    subnet's own sweep, which carries the subnet) at one lr x wd (x module multipliers)."""

    kind: ClassVar[str] = "hparams"
    method: str
    lr: float
    weight_decay: float
    group: str  # the sweep it belongs to: ASHA compares a point only with its own sweep
    module_lr: dict[str, float] = field(default_factory=dict)
    subnet: dict[str, Any] | None = None

    def describe(self) -> str:
        scales = "".join(f" {k} x{v:g}" for k, v in sorted(self.module_lr.items()))
        return f"{super().describe()} {self.method} lr {self.lr:g} wd {self.weight_decay:g}{scales}"


@dataclass(frozen=True, kw_only=True)
class RetrainTask(Task):
    """One subnet retrained from the pretrained backbone: a searched one (``rank<r>``) or a
    baseline (``baseline-NAME``)."""

    kind: ClassVar[str] = "retrain"
    label: str
    role: str  # "searched", "searched (not reported)" or "baseline"
    subnet: dict[str, Any]
    full_finetune: bool = False
    val_acc: float | None = None  # the search's score of a searched subnet
    candidate_run_id: str | None = None  # a searched subnet's candidate run in MLflow
    search_run_id: str | None = None  # ... and its search's run
    verify_run_id: str | None = None  # ... and its verification's run (stages.verify)
    verified_loss: float | None = None  # the verified run's loss (``retrain.verified_loss``)

    def describe(self) -> str:
        return f"{super().describe()} {self.label}"


@dataclass(frozen=True, kw_only=True)
class VerifyPoint(Task):
    """One candidate of a verification (``stages.verify``): a subnet trained alone with the
    short recipe, scored on val each epoch; ASHA compares it with its group's (dataset and
    seed) other candidates."""

    kind: ClassVar[str] = "verify"
    label: str  # c01, c02, ... in the order the candidates were listed
    subnet: dict[str, Any]
    origin: str  # "search rank 2", "anchor", "baseline lora", or several joined by ", "
    group: str
    search_val_acc: float | None = None  # the supernet's score, where the search scored it
    candidate_run_id: str | None = None

    def describe(self) -> str:
        return f"{super().describe()} {self.label}"


TASK_TYPES: dict[str, type[Task]] = {
    t.kind: t for t in (Task, SweepPoint, RetrainTask, VerifyPoint)
}


def task_from_config(config: dict[str, Any]) -> Task:
    """The task a trial's config holds (``Task.to_config``)."""
    cls = TASK_TYPES[config.get("kind", Task.kind)]
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names})
