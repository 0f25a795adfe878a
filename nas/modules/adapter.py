"""The adapter's module: a bottleneck on a block's branch, at the position and with the scaling
each layer's value sets (what the adapter is as data: ``nas.modules.adapter_kind``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from nas.modules.adapter_kind import (
    AFTER_ATTN,
    DIM_MASK,
    PARALLEL,
    SCALED,
    SITE_OF,
    AdapterKind,
    dim_of,
    position_of,
)
from nas.modules.base import LayeredModule
from nas.modules.spaces import trim
from nas.towers.geometry import TowerGeometry


class _AdapterLayer(nn.Module):
    def __init__(self, hidden: int, width: int, scaled: bool) -> None:
        super().__init__()
        self.down_weight = nn.Parameter(torch.empty(hidden, width))
        self.down_bias = nn.Parameter(torch.empty(hidden))
        self.up_weight = nn.Parameter(torch.empty(width, hidden))
        self.up_bias = nn.Parameter(torch.empty(width))
        nn.init.xavier_uniform_(self.down_weight)
        nn.init.xavier_uniform_(self.up_weight)
        nn.init.normal_(self.down_bias, std=1e-6)
        nn.init.normal_(self.up_bias, std=1e-6)
        if scaled:
            self.scale = nn.Parameter(torch.ones(width))


class Adapter(AdapterKind, LayeredModule):
    slice_axes: ClassVar[dict[str, int | None]] = {
        "down_weight": 0,
        "down_bias": 0,
        "up_weight": 1,
        "up_bias": None,
    }

    def __init__(
        self, geometry: TowerGeometry, capacity: Sequence[int], options: Any = None
    ) -> None:
        super().__init__(geometry, capacity, options)
        # The attention's output is hooked only where some layer may put an adapter there.
        attn = any(v & AFTER_ATTN for v in self.capacity)
        self.sites = frozenset({"mlp", "attn"} if attn else {"mlp"})

    # -- runtime -------------------------------------------------------------------------------
    def make_layer(self, dim: int) -> nn.Module:
        return _AdapterLayer(dim_of(dim), self.geometry.width, bool(dim & SCALED))

    def fits(self, choice: Sequence[int]) -> bool:
        choice = trim(choice)
        return len(choice) <= len(self.capacity) and all(
            dim_of(v) <= dim_of(c)
            and (v & ~DIM_MASK) & ~c == 0
            and position_of(v) != AFTER_ATTN | PARALLEL  # one position per layer
            for v, c in zip(choice, self.capacity, strict=False)
        )

    def sliced(self, layer: int, dim: int) -> dict[str, torch.Tensor]:
        out = super().sliced(layer, dim_of(dim))
        if dim & SCALED:
            out["scale"] = self.layers[str(layer)].scale
        return out

    def site_out(self, layer: int, op: str, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        value = self.dim(layer)
        if value == 0 or SITE_OF[position_of(value)] != op:
            return h
        w = self.sliced(layer, value)
        z = F.linear(x if value & PARALLEL else h, w["down_weight"], w["down_bias"])
        z = z * torch.sigmoid(1.702 * z)  # QuickGELU, as in NOAH
        z = F.dropout(z, self.options.dropout, self.training)
        z = F.linear(z, w["up_weight"], w["up_bias"])
        return h + (z * w["scale"] if value & SCALED else z)
