"""Adapter: a bottleneck after each block's MLP (Houlsby et al., 2019), as NOAH builds it.

``h = mlp(norm2(x)); h = h + up(dropout(QuickGELU(down(h))))``, then the block's own residual:
width -> h_i -> width with biases, Xavier-uniform weights and N(0, 1e-6) biases. The supernet
uses ``down[:h]`` and ``up[:, :h]`` (the output bias is shared by every h > 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from nas.modules.base import LayeredModule
from nas.towers.geometry import TowerGeometry


class _AdapterLayer(nn.Module):
    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.down_weight = nn.Parameter(torch.empty(hidden, width))
        self.down_bias = nn.Parameter(torch.empty(hidden))
        self.up_weight = nn.Parameter(torch.empty(width, hidden))
        self.up_bias = nn.Parameter(torch.empty(width))
        nn.init.xavier_uniform_(self.down_weight)
        nn.init.xavier_uniform_(self.up_weight)
        nn.init.normal_(self.down_bias, std=1e-6)
        nn.init.normal_(self.up_bias, std=1e-6)


class Adapter(LayeredModule):
    kind = "adapter"
    sites = frozenset({"mlp"})
    noah_key = "ADAPTER_DIM"
    options: ClassVar[dict[str, float]] = {"dropout": 0.1}
    slice_axes: ClassVar[dict[str, int | None]] = {
        "down_weight": 0,
        "down_bias": 0,
        "up_weight": 1,
        "up_bias": None,
    }

    @classmethod
    def layer_params(cls, dim: int, geometry: TowerGeometry) -> int:
        return 2 * geometry.width * dim + dim + geometry.width

    @classmethod
    def flops(
        cls, choice: Sequence[int], geometry: TowerGeometry, seq_lens: Sequence[int], merged: bool
    ) -> int:
        return sum(4 * seq_lens[i] * geometry.width * dim for i, dim in enumerate(choice))

    def make_layer(self, dim: int) -> nn.Module:
        return _AdapterLayer(dim, self.geometry.width)

    def site_out(self, layer: int, op: str, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        hidden = self.dim(layer)
        if hidden == 0:
            return h
        w = self.sliced(layer, hidden)
        z = F.linear(h, w["down_weight"], w["down_bias"])
        z = z * torch.sigmoid(1.702 * z)  # QuickGELU, as in NOAH
        z = F.dropout(z, self.config["dropout"], self.training)
        return h + F.linear(z, w["up_weight"], w["up_bias"])
