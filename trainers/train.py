"""Training and evaluation of prompted ViTs. Nothing here knows about Ray or MLflow: progress
goes to a callback, and state to a dict the caller saves wherever it likes.

- ``train``: the supernet (a new random subnet every mini-batch, as NOAH does) or one fixed
  subnet (retraining), AdamW with linear warm-up and cosine decay, mixed precision on CUDA.
  Each epoch's data order, subnet draws and dropout come from (seed, epoch), so training
  resumed from an epoch checkpoint continues exactly as an uninterrupted run would.
- ``evaluate`` / ``evaluate_candidates``: accuracy of one or many subnets on a split.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from nas.data.decode import DecodedSplit
from nas.data.loader import TensorLoader
from nas.model import PromptedViT
from nas.subnet import Subnet


@dataclass(frozen=True)
class TrainConfig:
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
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up from ``warmup_lr`` to ``lr``, then cosine decay to ``min_lr``."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / warmup
    total = max(1, cfg.epochs * steps_per_epoch - warmup)
    progress = min(1.0, (step - warmup) / total)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def autocast(device: torch.device):
    """bf16 autocast on a GPU, nothing on a CPU: the precision every loop here trains in."""
    return torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")


def train(
    model: PromptedViT,
    data: DecodedSplit,
    cfg: TrainConfig,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    sample_subnet: Callable[[random.Random], Subnet] | None = None,
    state: dict[str, Any] | None = None,
    on_epoch: Callable[[int, dict[str, float], Callable[[], dict[str, Any]]], None] | None = None,
) -> dict[str, float]:
    """Train ``model``'s modules and head on ``data``.

    Args:
        sample_subnet: draws the subnet of each mini-batch (supernet training); None trains
            the model's current subnet.
        state: a dict from an earlier run's ``get_state()`` to resume from.
        on_epoch: called after every epoch with (epoch number from 1, metrics, get_state).
    """
    device = next(model.parameters()).device
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
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
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, epoch * len(loader) + i, len(loader))
            model.set_subnet(sample_subnet(rng) if sample_subnet else fixed)
            with autocast(device):
                logits = model(x)
                loss = loss_fn(logits.float(), y)
            if loss.requires_grad:  # a draw with nothing to train (CLIP's empty subnet: no
                optimizer.zero_grad(set_to_none=True)  # head) is a zero update: no step
                loss.backward()
                optimizer.step()
            total += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
        mean_loss = total.item() / seen
        if not math.isfinite(mean_loss):  # a NaN or infinite loss anywhere in the epoch; the
            # last checkpoint (taken after an epoch) holds no weight it touched
            raise FloatingPointError(f"loss is {mean_loss} in epoch {epoch + 1}")
        metrics = {
            "train_loss": mean_loss,
            "train_acc": correct.item() / seen,
            "lr": optimizer.param_groups[0]["lr"],
        }
        if on_epoch is not None:

            def get_state(epoch=epoch) -> dict[str, Any]:
                return {
                    "epoch": epoch + 1,
                    "model": trainable_copy(model),
                    "optimizer": copy.deepcopy(
                        optimizer.state_dict()
                    ),  # a snapshot: it keeps changing
                }

            on_epoch(epoch + 1, metrics, get_state)
    model.set_subnet(fixed)
    return metrics


def trainable_copy(model: PromptedViT) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.trainable_state_dict().items()}


def load_trainable(model: PromptedViT, tensors: dict[str, torch.Tensor]) -> None:
    expected = model.trainable_state_dict()
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(
            f"checkpoint does not match the model (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    model.load_trainable(tensors)


@torch.no_grad()
def evaluate_candidates(
    model: PromptedViT,
    subnets: Sequence[Subnet],
    data: DecodedSplit,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
) -> list[float]:
    """Accuracy of each subnet on ``data`` with the model's (inherited) weights. The split is
    normalised once and reused for every candidate."""
    device = next(model.parameters()).device
    batches = list(TensorLoader(data, batch_size, mean, std, device=device))
    return [_accuracy(model, s, batches, len(data)) for s in subnets]


def _accuracy(model: PromptedViT, subnet: Subnet, batches, total: int) -> float:
    device = next(model.parameters()).device
    model.eval()
    previous = model.subnet
    model.set_subnet(subnet)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for x, y in batches:
        with autocast(device):
            correct += (model(x).argmax(1) == y).sum()
    model.set_subnet(previous)
    return correct.item() / total  # one synchronisation per candidate


def evaluate(model: PromptedViT, data: DecodedSplit, *, mean, std) -> float:
    return evaluate_candidates(model, [model.subnet], data, mean=mean, std=std)[0]
