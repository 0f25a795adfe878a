"""The stages' settings of an experiment spec (``stages:`` in its YAML): what each stage
accepts, its NOAH defaults, and their validation, so that a bad value is found at load."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from nas.space.subnet import Subnet
from nas.training.train import Schedule, TrainConfig

# Baselines that are not subnets: the head alone on the frozen backbone (the same as an empty
# subnet), and full fine-tuning (every backbone weight trains, with the head).


@dataclass(frozen=True)
class HparamsSettings:
    """Stage 0 (optional): a learning-rate x weight-decay sweep per dataset and method (the
    supernet, and each baseline) on train/val only, early-stopped with ASHA."""

    enabled: bool = False
    lrs: tuple[float, ...] = (1e-4, 5e-4, 1e-3, 5e-3)
    weight_decays: tuple[float, ...] = (1e-4, 1e-2)
    epochs: int = 20
    batch_size: int = 64
    grace_period: int = 2  # ASHA: epochs every trial gets before it can be stopped
    reduction_factor: int = 3  # ASHA: keep the best 1/reduction_factor at each rung
    eval_subnets: int = 4  # the supernet is scored by the mean over this many fixed subnets
    # Per-module learning-rate multipliers swept for the supernet (and the searched subnets'
    # retraining), e.g. {pgn: [1, 4]}: every combination joins the lr x wd grid.
    module_lrs: dict[str, tuple[float, ...]] = field(default_factory=dict)
    # After the search, each searched subnet gets a sweep of its own retraining rates (the same
    # grid, as a baseline does) instead of retraining at the supernet's swept rates.
    sweep_searched: bool = False

    def module_lr_grid(self) -> list[dict[str, float]]:
        """Every combination of the swept multipliers ([{}] when none is swept)."""
        kinds = sorted(self.module_lrs)
        return [
            dict(zip(kinds, combo, strict=True))
            for combo in itertools.product(*(self.module_lrs[k] for k in kinds))
        ]


@dataclass(frozen=True, kw_only=True)
class TrainingSettings(Schedule):
    """What a training stage sets: a schedule (``nas.training.train.Schedule``) with NOAH's
    defaults for the supernet, overridden per stage."""

    epochs: int = 500
    warmup_epochs: int = 10

    def train_config(
        self,
        *,
        lr: float,
        weight_decay: float,
        seed: int,
        module_lr: dict[str, float] | None = None,
    ) -> TrainConfig:
        """The training loop's settings, with the (possibly tuned) lr and weight decay; tuned
        module multipliers replace the stage's own for the kinds they name."""
        return TrainConfig(
            **{
                **self.schedule(),
                "lr": lr,
                "weight_decay": weight_decay,
                "module_lr": {**self.module_lr, **(module_lr or {})},
                "module_weight_decay": dict(self.module_weight_decay),
            },
            seed=seed,
        )


@dataclass(frozen=True)
class SupernetSettings(TrainingSettings):
    checkpoint_every: int = 10
    # How subnets are drawn (nas.training.sampling; README, "Choosing how the supernet trains"):
    sampling: str = "uniform"  # NOAH's per-layer draws, or "balanced" over subnet sizes
    in_budget: bool = False  # redraw subnets outside the budget
    subnets_per_step: int = 1  # random subnets per mini-batch, gradients averaged
    sandwich: bool = False  # the largest and smallest subnets also train every step
    distill: float = 0.0  # weight of the KL to the largest subnet's detached predictions
    anchor_share: float = 0.0  # share of the random draws that are the search's anchors


#: ``in_budget`` redraws until a subnet fits: it needs this share of draws to fit (2,000 tried
#: at load), so that a draw never runs out of its 10,000 attempts in a long run.
MIN_ACCEPTANCE = 0.01

#: Settings added after specs were first hashed: left out of the hash at their defaults, so that
#: an existing run folder keeps its hash (and resumes) after an upgrade.
LATER_FIELDS = {
    "module_lr": {},
    "module_weight_decay": {},
    "module_lrs": {},
    "sampling": "uniform",
    "in_budget": False,
    "subnets_per_step": 1,
    "sandwich": False,
    "distill": 0.0,
    "sweep_searched": False,
    "anchor_share": 0.0,
}


def hashed(stage: Any) -> dict[str, Any]:
    return {k: v for k, v in asdict(stage).items() if LATER_FIELDS.get(k, ...) != v}


@dataclass(frozen=True)
class SearchSettings:
    enabled: bool = True  # false: no supernet and no search; only the baselines are retrained
    algorithm: str = "evolution"
    cost: str = "params"
    options: dict[str, Any] = field(default_factory=dict)
    eval_batch_size: int = 256


@dataclass(frozen=True)
class VerifySettings:
    """Between search and retraining (optional): the search's ``top_k`` best distinct
    candidates, with ``anchors`` also each module alone at its largest size in budget, the
    largest subnets along each module and the spec's baselines, trained alone on train for
    ``epochs`` (a baseline's own swept rate where it has one, else the supernet's), stopped
    early by successive halving (ASHA: ``grace_period``, ``reduction_factor``) on val; the
    best on val is what the later stages retrain."""

    enabled: bool = False
    top_k: int = 5
    anchors: bool = True
    epochs: int = 10
    batch_size: int = 64
    grace_period: int = 2
    reduction_factor: int = 3


@dataclass(frozen=True)
class RetrainSettings(TrainingSettings):
    epochs: int = 100
    lr: float = 1e-3
    top_k: int = 1
    baselines: dict[str, Subnet] = field(default_factory=dict)
    # Baselines that train the whole backbone too (full fine-tuning; their subnet is empty).
    full_finetune: tuple[str, ...] = ()

    def subnet_baselines(self) -> dict[str, Subnet]:
        """The baselines that are subnets of the space, by name (full fine-tuning is not: its
        empty subnet stands for training the whole backbone)."""
        return {n: s for n, s in self.baselines.items() if n not in self.full_finetune}


class StageSettings(NamedTuple):
    hparams: HparamsSettings
    supernet: SupernetSettings
    search: SearchSettings
    verify: VerifySettings
    retrain: RetrainSettings
