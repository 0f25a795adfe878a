"""LoRA: a low-rank update of the fused qkv projection (Hu et al., 2021), as NOAH builds it.

``qkv(x) + B (A dropout(x))`` with ``A``: width -> r (Kaiming-uniform, like nn.Linear),
``B``: r -> 3 * width (zero init, so a fresh module changes nothing), no alpha/r scaling.
Rank ``r_i`` per layer; the supernet uses ``A[:r]`` and ``B[:, :r]``. Once trained, ``B A``
can be merged into the frozen qkv weight (zero inference overhead).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from nas.modules.base import LayeredModule
from nas.towers.geometry import TowerGeometry


class _LoRALayer(nn.Module):
    def __init__(self, rank: int, width: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, width))
        self.B = nn.Parameter(torch.zeros(3 * width, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))


class LoRA(LayeredModule):
    kind = "lora"
    sites = frozenset({"qkv"})
    options: ClassVar[dict[str, float]] = {"dropout": 0.1}
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

    def qkv_delta(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        rank = self.dim(layer)
        if rank == 0:
            return None
        w = self.sliced(layer, rank)
        x = F.dropout(x, self.config["dropout"], self.training)
        return F.linear(F.linear(x, w["A"]), w["B"])

    def merged_weight(self, layer: int) -> torch.Tensor | None:
        """``B A`` of the active rank at ``layer``: what merging adds to the qkv weight."""
        rank = self.dim(layer)
        if rank == 0:
            return None
        w = self.sliced(layer, rank)
        return w["B"] @ w["A"]
