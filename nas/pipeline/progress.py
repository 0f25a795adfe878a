"""What a trial reports as it goes, as typed events: the Ray adapter hands an event's numbers to
Tune (the hparams stage's ASHA reads ``val_acc``) and prints its line; the stage code builds the
events and knows nothing about Ray."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Progress:
    """Where a trial is: its stage, dataset, seed (and label), and the seconds left."""

    stage: str
    dataset: str
    seed: int
    label: str | None = None
    eta_s: float | None = None

    def numbers(self) -> dict[str, float]:
        """What Tune records for the trial's latest result."""
        out: dict[str, float] = {"seed": self.seed}
        if self.eta_s is not None:
            out["eta_s"] = self.eta_s
        return out

    def head(self) -> str:
        label = f" {self.label}" if self.label is not None else ""
        return f"[{self.stage} {self.dataset} seed {self.seed}{label}]"

    def left(self) -> str:
        return f", ~{self.eta_s:.0f} s left" if self.eta_s is not None else ""

    def line(self) -> str:
        return self.head()


@dataclass(frozen=True)
class EpochProgress(Progress):
    """A training's epoch (supernet, retraining): its loss, accuracy and rate."""

    epoch: int = 0
    epochs: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # train_loss, train_acc, lr

    def numbers(self) -> dict[str, float]:
        return {**super().numbers(), "epoch": self.epoch, "epochs": self.epochs, **self.metrics}

    def line(self) -> str:
        m = self.metrics
        return (
            f"{self.head()} epoch {self.epoch}/{self.epochs}: loss {m['train_loss']:.4f}, "
            f"train acc {m['train_acc']:.4f}{self.left()}"
        )


@dataclass(frozen=True)
class SweepProgress(EpochProgress):
    """A sweep point's epoch: its own rates, and the validation accuracy ASHA compares."""

    lr: float = 0.0  # the point's rate (``metrics["lr"]`` is the scheduled one)
    weight_decay: float = 0.0
    module_lr: dict[str, float] = field(default_factory=dict)
    val_acc: float = 0.0

    def numbers(self) -> dict[str, float]:
        own = {"lr": self.lr, "weight_decay": self.weight_decay, "val_acc": self.val_acc}
        return {**super().numbers(), **own}

    def line(self) -> str:
        scales = "".join(f" {k} x{v:g}" for k, v in sorted(self.module_lr.items()))
        return (
            f"{self.head()} lr {self.lr:g}{scales} wd {self.weight_decay:g} epoch "
            f"{self.epoch}/{self.epochs}: val acc {self.val_acc:.4f}{self.left()}"
        )


@dataclass(frozen=True)
class SearchProgress(Progress):
    """A search round: candidates scored so far of those planned, the best score."""

    round: int = 0
    evaluated: int = 0
    planned: int = 0
    best_val_acc: float = 0.0

    def numbers(self) -> dict[str, float]:
        own = {"round": self.round, "evaluated": self.evaluated, "planned": self.planned}
        return {**super().numbers(), **own, "best_val_acc": self.best_val_acc}

    def line(self) -> str:
        return (
            f"{self.head()} round {self.round}: {self.evaluated}/{self.planned} candidates, "
            f"best val acc {self.best_val_acc:.4f}{self.left()}"
        )


#: How a trial reports its progress (the Ray adapter's, or nothing).
Report = Callable[[Progress], None]
