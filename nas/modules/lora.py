"""LoRA's module: per-layer low-rank updates of a linear layer's weight, ``W + B A`` (what LoRA
is as data: ``nas.modules.lora_kind``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from nas.modules.base import LayeredModule
from nas.modules.lora_kind import LoRAFc1Kind, LoRAFc2Kind, LoRAKind, LoRAProjKind, widths
from nas.towers.geometry import Weights


class _LoRALayer(nn.Module):
    def __init__(self, rank: int, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, fan_in))
        self.B = nn.Parameter(torch.zeros(fan_out, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))


class LoRA(LoRAKind, LayeredModule):
    slice_axes: ClassVar[dict[str, int | None]] = {"A": 0, "B": 1}

    def make_layer(self, dim: int) -> nn.Module:
        return _LoRALayer(dim, *widths(self.target, self.geometry))

    def site_out(self, layer: int, op: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        rank = self.dim(layer)
        if rank == 0:
            return out
        w = self.sliced(layer, rank)
        x = F.dropout(x, self.options.dropout, self.training)
        return out + F.linear(F.linear(x, w["A"]), w["B"])

    def merged_weight(self, layer: int) -> torch.Tensor | None:
        """``B A`` of the active rank at ``layer``: what merging adds to the target's weight."""
        rank = self.dim(layer)
        if rank == 0:
            return None
        w = self.sliced(layer, rank)
        return w["B"] @ w["A"]

    def merge_into(self, operation: Callable[[int, str], Weights], *, inputs: bool) -> None:
        if inputs:
            return  # LoRA acts at an output only
        for layer in range(self.geometry.depth):
            delta = self.merged_weight(layer)
            if delta is not None:
                operation(layer, self.target).weight.add_(delta)

    def peft_adapter(
        self, name_of: Callable[[int, str], str]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        ranks, tensors = {}, {}
        for layer, rank in enumerate(self.active):
            if rank:
                w, name = self.sliced(layer, rank), name_of(layer, self.target)
                ranks[name] = rank
                tensors[f"{name}.lora_A.weight"] = w["A"]
                tensors[f"{name}.lora_B.weight"] = w["B"]
        top = max(ranks.values())
        config = {
            "peft_type": "LORA",
            "r": top,
            "lora_alpha": top,
            "target_modules": sorted(ranks),
            "rank_pattern": dict(sorted(ranks.items())),
            # PEFT scales B A by lora_alpha / r; this project's LoRA is unscaled.
            "alpha_pattern": dict(sorted(ranks.items())),
            "lora_dropout": self.options.dropout,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": False,
        }
        return config, tensors

    @classmethod
    def peft_combine(
        cls, parts: list[tuple[dict[str, Any], dict[str, torch.Tensor]]]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """One PEFT LoRA adapter from several LoRA kinds' (their targets' union, each at its
        own ranks); their dropouts must agree, as PEFT's ``lora_dropout`` is one number."""
        dropouts = {config["lora_dropout"] for config, _ in parts}
        if len(dropouts) > 1:
            raise ValueError(
                f"the LoRA kinds' dropouts differ ({sorted(dropouts)}); a PEFT adapter has one"
            )
        config = dict(parts[0][0])
        ranks = {k: v for c, _ in parts for k, v in c["rank_pattern"].items()}
        top = max(ranks.values())
        config.update(
            r=top,
            lora_alpha=top,
            target_modules=sorted(ranks),
            rank_pattern=dict(sorted(ranks.items())),
            alpha_pattern=dict(sorted(ranks.items())),
        )
        return config, {k: v for _, tensors in parts for k, v in tensors.items()}


class LoRAProj(LoRAProjKind, LoRA):
    pass


class LoRAFc1(LoRAFc1Kind, LoRA):
    pass


class LoRAFc2(LoRAFc2Kind, LoRA):
    pass
