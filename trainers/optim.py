"""Optimisers over what trains in a prompted model: its prompt modules and head."""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from torch import nn


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 1e-4
) -> torch.optim.Optimizer:
    """AdamW over the parameters that require gradients (NOAH's optimiser); the frozen
    backbone is not handed to the optimiser at all, so it cannot be touched by weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    # timm's factory, handed the parameters (not the model): no bias/norm exclusion
    return create_optimizer_v2(params, opt="adamw", lr=lr, weight_decay=weight_decay)


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
) -> float:
    """One cross-entropy step; returns the loss."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
