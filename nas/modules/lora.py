"""LoRA: a low-rank update of the fused qkv projection (Hu et al., 2021), as NOAH builds it.

``qkv(x) + B (A dropout(x))`` with ``A``: width -> r (Kaiming-uniform, like nn.Linear),
``B``: r -> 3 * width (zero init, so a fresh module changes nothing), no alpha/r scaling.
Rank ``r_i`` per layer; the supernet uses ``A[:r]`` and ``B[:, :r]``. Once trained, ``B A``
can be merged into the frozen qkv weight (zero inference overhead).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from nas.modules.base import LayeredModule
from nas.towers.geometry import TowerGeometry, Weights


class _LoRALayer(nn.Module):
    def __init__(self, rank: int, width: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, width))
        self.B = nn.Parameter(torch.zeros(3 * width, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))


class LoRA(LayeredModule):
    kind = "lora"
    sites = frozenset({"qkv"})
    noah_key = "LORA_DIM"
    options: ClassVar[dict[str, float]] = {"dropout": 0.1}
    mergeable = True
    peft_type = "LORA"
    slice_axes: ClassVar[dict[str, int | None]] = {"A": 0, "B": 1}

    @classmethod
    def layer_params(cls, dim: int, geometry: TowerGeometry) -> int:
        return dim * geometry.width + 3 * geometry.width * dim

    @classmethod
    def flops(
        cls, choice: Sequence[int], geometry: TowerGeometry, seq_lens: Sequence[int], merged: bool
    ) -> int:
        if merged:
            return 0
        return sum(
            2 * seq_lens[i] * cls.layer_params(dim, geometry) for i, dim in enumerate(choice)
        )

    def make_layer(self, dim: int) -> nn.Module:
        return _LoRALayer(dim, self.geometry.width)

    def site_out(self, layer: int, op: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        rank = self.dim(layer)
        if rank == 0:
            return out
        w = self.sliced(layer, rank)
        x = F.dropout(x, self.config["dropout"], self.training)
        return out + F.linear(F.linear(x, w["A"]), w["B"])

    def merged_weight(self, layer: int) -> torch.Tensor | None:
        """``B A`` of the active rank at ``layer``: what merging adds to the qkv weight."""
        rank = self.dim(layer)
        if rank == 0:
            return None
        w = self.sliced(layer, rank)
        return w["B"] @ w["A"]

    def merge_into(self, operation: Callable[[int, str], Weights]) -> None:
        for layer in range(self.geometry.depth):
            delta = self.merged_weight(layer)
            if delta is not None:
                operation(layer, "qkv").weight.add_(delta)

    def peft_adapter(
        self, name_of: Callable[[int, str], str]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        ranks = {name_of(layer, "qkv"): rank for layer, rank in enumerate(self.active) if rank}
        tensors = {}
        for layer, rank in enumerate(self.active):
            if rank:
                w, name = self.sliced(layer, rank), name_of(layer, "qkv")
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
            "lora_dropout": float(self.config["dropout"]),
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": False,
        }
        return config, tensors
