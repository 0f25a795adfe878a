"""Which learning rates a training uses (``tuned``): the hparams stage's winner of its method's
sweep when it ran, else the stage's own settings; and whose sweep a retraining reads."""

from __future__ import annotations

from dataclasses import dataclass, field

from nas.core.jsonio import read_json
from nas.pipeline.layout import done_marker, run_layout
from nas.spec.experiment import ExperimentSpec


@dataclass(frozen=True)
class Tuned:
    """A method's training rates: the hparams stage's winner, or the stage's own settings."""

    lr: float
    weight_decay: float
    module_lr: dict[str, float] = field(default_factory=dict)  # swept multipliers only


def searched_method(label: str, seed: int) -> str:
    """The hparams method of one searched subnet's own sweep (``hparams.sweep_searched``)."""
    return f"searched-{label}-seed{seed}"


def retrain_method(spec: ExperimentSpec, label: str, role: str, seed: int) -> str:
    """Whose swept rates a retraining uses: a baseline its own; a searched subnet its own
    sweep's with ``hparams.sweep_searched``, else the supernet's (NOAH's recipe)."""
    if role == "baseline":
        return label
    return searched_method(label, seed) if spec.hparams.sweep_searched else "supernet"


def tuned(spec: ExperimentSpec, dataset: str, method: str) -> Tuned:
    """The rates of a method: the hparams stage's winner when it ran, else the stage's own
    settings ("supernet" covers the supernet and, unless they have sweeps of their own
    (``searched_method``), the searched subnets' retraining; "baseline-NAME" a baseline's
    retraining). Swept module multipliers replace the stage's own for the kinds they name
    (``TrainingSettings.train_config``)."""
    done = done_marker(run_layout(spec).hparams(dataset, method))
    if spec.hparams.enabled and done.is_file():
        winner = read_json(done)
        return Tuned(
            float(winner["lr"]),
            float(winner["weight_decay"]),
            {k: float(v) for k, v in winner.get("module_lr", {}).items()},
        )
    if method == "supernet":
        return Tuned(spec.supernet.lr, spec.supernet.weight_decay)
    return Tuned(spec.retrain.lr, spec.retrain.weight_decay)
