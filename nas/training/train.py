"""Training and evaluation of prompted ViTs. Nothing here knows about Ray or MLflow: progress
goes to a callback, and state to a dict the caller saves wherever it likes.

- ``train``: the supernet (a new random subnet every mini-batch, as NOAH does; or, with
  ``SupernetSteps``, several per mini-batch with the sandwich rule and in-place distillation)
  or one fixed subnet (retraining), AdamW with linear warm-up and cosine decay, per-module
  learning-rate and weight-decay multipliers, mixed precision on CUDA.
  Each epoch's data order, subnet draws and dropout come from (seed, epoch), so training
  resumed from an epoch checkpoint continues exactly as an uninterrupted run would.
- ``evaluate`` / ``evaluate_candidates``: accuracy of one or many subnets on a split.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn

from nas.data.decode import DecodedSplit
from nas.data.loader import TensorLoader
from nas.families.prompted import PromptedModel
from nas.modules import REGISTRY
from nas.space.subnet import Subnet


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """A training schedule's settings: what a spec's training stage sets
    (``nas.spec.stages.TrainingSettings``, with NOAH's defaults) and the loop trains with
    (``TrainConfig``, with its seed)."""

    epochs: int
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup_epochs: int = 0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    label_smoothing: float = 0.0
    crop_pad: int = 0
    hflip: bool = False
    # Multipliers of ``lr`` and ``weight_decay`` per prompt-module kind (``"head"`` for the
    # classifier, ``"backbone"`` for full fine-tuning), e.g. {pgn: 4.0}: PGN's generator wants
    # a larger rate than VPT; a group not named keeps 1.
    module_lr: dict[str, float] = field(default_factory=dict)
    module_weight_decay: dict[str, float] = field(default_factory=dict)

    def schedule(self) -> dict[str, Any]:
        """The schedule's own fields (not a subclass's), by name."""
        return {f.name: getattr(self, f.name) for f in fields(Schedule)}


@dataclass(frozen=True, kw_only=True)
class TrainConfig(Schedule):
    """What the training loop trains with: a schedule and its seed."""

    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Flat settings (MLflow params); the multipliers as ``module_lr.<kind>`` keys, and
        absent when none is set, so that the settings of a run without them read as before."""
        out = {k: v for k, v in asdict(self).items() if not isinstance(v, dict)}
        for name in ("module_lr", "module_weight_decay"):
            out.update({f"{name}.{k}": v for k, v in sorted(getattr(self, name).items())})
        return out


@dataclass(frozen=True)
class SupernetSteps:
    """What one supernet training step trains (all subnets on the same mini-batch, their
    gradients averaged into one optimizer step).

    Args:
        sample: draws one random subnet (``nas.training.sampling.make_sampler``).
        per_step: random subnets per step (NOAH: 1).
        sandwich: the largest and the smallest subnet also train every step (BigNAS's
            sandwich rule), before the random ones.
        largest / smallest: those subnets (``largest`` is also the distillation teacher).
        distill: weight of in-place distillation: each other subnet's loss is
            ``(1 - distill) * CE + distill * KL(teacher || subnet)``, the teacher being the
            largest subnet's detached predictions on the same mini-batch (computed without
            gradients when the sandwich rule is off).
    """

    sample: Callable[[random.Random], Subnet]
    per_step: int = 1
    sandwich: bool = False
    largest: Subnet | None = None
    smallest: Subnet | None = None
    distill: float = 0.0

    def __post_init__(self) -> None:
        if self.per_step < (0 if self.sandwich else 1):
            raise ValueError(f"per_step must be at least 1 without the sandwich rule: {self}")
        if (self.sandwich or self.distill) and self.largest is None:
            raise ValueError("the sandwich rule and distillation need the largest subnet")
        if self.sandwich and self.smallest is None:
            raise ValueError("the sandwich rule needs the smallest subnet")
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"distill is a weight in [0, 1], not {self.distill}")

    def draws(self, rng: random.Random) -> list[Subnet]:
        fixed = [self.largest, self.smallest] if self.sandwich else []
        return fixed + [self.sample(rng) for _ in range(self.per_step)]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the class distributions, averaged over the batch; the
    teacher's logits are detached (no gradient flows into the teacher)."""
    return F.kl_div(
        F.log_softmax(student.float(), dim=1),
        F.log_softmax(teacher.detach().float(), dim=1),
        reduction="batchmean",
        log_target=True,
    )


def parameter_groups(model: PromptedModel, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: one group (as always) when no multiplier is set,
    else one per prompt-module kind, the head, and the backbone, each with its scales."""
    params = model.trainable_parameters()
    if not cfg.module_lr and not cfg.module_weight_decay:
        return [{"params": params, "lr_scale": 1.0}]
    owner: dict[int, str] = {}
    for kind, module in model.prompt_modules.items():
        owner.update((id(p), kind) for p in module.parameters())
    heads = {id(p) for head in model.tower.head_modules() for p in head.parameters()}
    by_group: dict[str, list[nn.Parameter]] = {}
    for p in params:
        name = owner.get(id(p)) or ("head" if id(p) in heads else "backbone")
        by_group.setdefault(name, []).append(p)
    known = [*REGISTRY, "head", "backbone"]  # a kind this model lacks has no group: ignored
    unknown = sorted((set(cfg.module_lr) | set(cfg.module_weight_decay)) - set(known))
    if unknown:
        raise ValueError(f"multipliers for {unknown}: expected module kinds or {known}")
    return [
        {
            "params": ps,
            "name": name,
            "lr_scale": cfg.module_lr.get(name, 1.0),
            "weight_decay": cfg.weight_decay * cfg.module_weight_decay.get(name, 1.0),
        }
        for name, ps in by_group.items()
    ]


def lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> CosineLRScheduler:
    """timm's cosine schedule, stepped per optimizer step: linear warm-up from ``warmup_lr``
    to ``lr`` over ``warmup_epochs``, then cosine decay to ``min_lr`` at the last step; each
    parameter group's ``lr_scale`` (the per-module multipliers) applied by timm."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, cfg.epochs * steps_per_epoch - warmup),
        lr_min=cfg.min_lr,
        warmup_t=warmup,
        warmup_lr_init=cfg.warmup_lr,
        warmup_prefix=True,  # the cosine starts where the warm-up ends
        cycle_limit=1,
        t_in_epochs=False,
    )


def autocast(device: torch.device):
    """bf16 autocast on a GPU, nothing on a CPU: the precision every loop here trains in."""
    return torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")


def train(
    model: PromptedModel,
    data: DecodedSplit,
    cfg: TrainConfig,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    sample_subnet: Callable[[random.Random], Subnet] | SupernetSteps | None = None,
    state: dict[str, Any] | None = None,
    on_epoch: Callable[[int, dict[str, float], Callable[[], dict[str, Any]]], None] | None = None,
) -> dict[str, float]:
    """Train ``model``'s modules and head on ``data``.

    Args:
        sample_subnet: draws the subnet of each mini-batch (supernet training, NOAH's one
            subnet per step), or a ``SupernetSteps`` (several per step, sandwich rule,
            distillation); None trains the model's current subnet.
        state: a dict from an earlier run's ``get_state()`` to resume from.
        on_epoch: called after every epoch with (epoch number from 1, metrics, get_state).
    """
    device = next(model.parameters()).device
    optimizer = create_optimizer_v2(
        parameter_groups(model, cfg), opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    steps = SupernetSteps(sample_subnet) if callable(sample_subnet) else sample_subnet
    loader = TensorLoader(
        data,
        cfg.batch_size,
        mean,
        std,
        shuffle=True,
        seed=cfg.seed,
        device=device,
        crop_pad=cfg.crop_pad,
        hflip=cfg.hflip,
    )
    start = 0
    if state is not None:
        load_trainable(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["epoch"])
    for group in optimizer.param_groups:  # timm's base rate: the spec's, whatever was saved
        group["initial_lr"] = cfg.lr
    schedule = lr_scheduler(optimizer, cfg, len(loader))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    fixed = model.subnet
    metrics: dict[str, float] = {}
    for epoch in range(start, cfg.epochs):
        model.train()
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)  # dropout / drop-path of this epoch
        rng = random.Random(cfg.seed * 1_000_003 + epoch)  # subnet draws of this epoch
        loader.set_epoch(epoch)
        # Sums stay on the device: nothing waits for the GPU until the epoch ends.
        total = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        for i, (x, y) in enumerate(loader):
            schedule.step_update(epoch * len(loader) + i)  # a group without lr_scale: 1
            first = optimizer.param_groups[0]
            lr = first["lr"] / first.get("lr_scale", 1.0)  # the schedule's own value
            draws = steps.draws(rng) if steps else [fixed]
            _step(model, optimizer, loss_fn, steps, draws, x, y, sums=(total, correct))
            seen += len(y)
        mean_loss = total.item() / seen
        if not math.isfinite(mean_loss):  # a NaN or infinite loss anywhere in the epoch; the
            # last checkpoint (taken after an epoch) holds no weight it touched
            raise FloatingPointError(f"loss is {mean_loss} in epoch {epoch + 1}")
        metrics = {
            "train_loss": mean_loss,
            "train_acc": correct.item() / seen / (len(draws) if steps else 1),
            "lr": lr,
        }
        if on_epoch is not None:
            on_epoch(epoch + 1, metrics, _state_getter(model, optimizer, epoch + 1))
    model.set_subnet(fixed)
    return metrics


def _step(
    model: PromptedModel,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    steps: SupernetSteps | None,
    draws: list[Subnet],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    sums: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """One optimizer step on a batch: each drawn subnet's loss, averaged over the draws (with
    distillation, the largest subnet teaching the others); the batch's loss and correct count
    are added to ``sums`` (the epoch's, kept on the device) in place."""
    total, correct = sums
    device = x.device
    teacher = None
    if steps and steps.distill and not steps.sandwich:
        teacher = _teacher_logits(model, steps.largest, x, device)
    optimizer.zero_grad(set_to_none=True)
    stepped = False
    for subnet in draws:
        model.set_subnet(subnet)
        with autocast(device):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
            if teacher is not None and subnet != steps.largest:
                kd = distillation_loss(logits, teacher)
                loss = (1 - steps.distill) * loss + steps.distill * kd
        if steps and steps.distill and steps.sandwich and subnet == steps.largest:
            teacher = logits.detach()
        if loss.requires_grad:  # a draw with nothing to train (CLIP's empty subnet: no head)
            (loss / len(draws)).backward()  # adds no gradient
            stepped = True
        total += loss.detach() * len(y) / len(draws)
        correct += (logits.argmax(1) == y).sum()
    if stepped:  # a step whose draws had nothing to train is a zero update: no step
        optimizer.step()


def _teacher_logits(
    model: PromptedModel, largest: Subnet, x: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """The largest subnet's predictions for in-place distillation, computed without a
    gradient and in eval mode (the teacher is not trained here: no dropout, no BN update)."""
    with torch.no_grad(), autocast(device):
        model.set_subnet(largest)
        model.eval()
        teacher = model(x)
        model.train()
    return teacher


def _state_getter(
    model: PromptedModel, optimizer: torch.optim.Optimizer, epochs_done: int
) -> Callable[[], dict[str, Any]]:
    """What ``on_epoch`` calls for a resume state: taken only when asked (a checkpoint), a
    snapshot of the optimizer (it keeps changing)."""

    def get_state() -> dict[str, Any]:
        return {
            "epoch": epochs_done,
            "model": trainable_copy(model),
            "optimizer": copy.deepcopy(optimizer.state_dict()),
        }

    return get_state


def trainable_copy(model: PromptedModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.trainable_state_dict().items()}


def load_trainable(model: PromptedModel, tensors: dict[str, torch.Tensor]) -> None:
    expected = model.trainable_state_dict()
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(
            f"checkpoint does not match the model (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    model.load_trainable(tensors)
