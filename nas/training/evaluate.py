"""Evaluation: a model's accuracy on a split (tested once, or on a target), and scoring many
candidate subnets of one supernet on the same batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from nas.data.decode import DecodedSplit
from nas.data.loader import TensorLoader
from nas.families.prompted import PromptedModel
from nas.space.subnet import Subnet
from nas.training.train import autocast


@torch.no_grad()
def evaluate_candidates(
    model: PromptedModel,
    subnets: Sequence[Subnet],
    data: DecodedSplit,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
) -> list[float]:
    """Accuracy of each subnet on ``data`` with the model's (inherited) weights. The split is
    normalised once and reused for every candidate."""
    scores = score_candidates(model, subnets, data, mean=mean, std=std, batch_size=batch_size)
    return [s["acc"] for s in scores]


@torch.no_grad()
def score_candidates(
    model: PromptedModel,
    subnets: Sequence[Subnet],
    data: DecodedSplit,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
) -> list[dict[str, float]]:
    """Accuracy (``acc``) and mean cross-entropy (``loss``) of each subnet on ``data``."""
    device = next(model.parameters()).device
    batches = list(TensorLoader(data, batch_size, mean, std, device=device))
    return [_scores(model, s, batches, len(data)) for s in subnets]


def _scores(model: PromptedModel, subnet: Subnet, batches, total: int) -> dict[str, float]:
    device = next(model.parameters()).device
    model.eval()
    previous = model.subnet
    model.set_subnet(subnet)
    correct = torch.zeros((), dtype=torch.long, device=device)
    loss = torch.zeros((), device=device)
    for x, y in batches:
        with autocast(device):
            logits = model(x)
        correct += (logits.argmax(1) == y).sum()
        loss += F.cross_entropy(logits.float(), y, reduction="sum")
    model.set_subnet(previous)
    # one synchronisation per candidate
    return {"acc": correct.item() / total, "loss": loss.item() / total}


def evaluate(model: PromptedModel, data: DecodedSplit, *, mean, std) -> float:
    return evaluate_candidates(model, [model.subnet], data, mean=mean, std=std)[0]


@torch.no_grad()
def evaluate_target(
    model: PromptedModel,
    data: DecodedSplit,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
) -> dict[str, Any]:
    """A domain-generalisation target's accuracy: ``all`` over every class of the model, and
    when the target holds only some of them (ImageNet-A and -R: 200 of 1,000), ``own``:
    restricted to those (the other classes' logits masked), the usual protocol; ``classes``
    counts the target's classes."""
    device = next(model.parameters()).device
    present = torch.zeros(data.num_classes, dtype=torch.bool, device=device)
    present[data.labels.unique().to(device)] = True
    model.eval()
    right_all = torch.zeros((), dtype=torch.long, device=device)
    right_own = torch.zeros((), dtype=torch.long, device=device)
    for x, y in TensorLoader(data, batch_size, mean, std, device=device):
        with autocast(device):
            logits = model(x).float()
        right_all += (logits.argmax(1) == y).sum()
        right_own += (logits.masked_fill(~present, float("-inf")).argmax(1) == y).sum()
    n, classes = len(data), int(present.sum())
    own = right_own.item() / n if classes < data.num_classes else None
    return {"all": right_all.item() / n, "own": own, "classes": classes}
