"""VPT's module: its prompt tokens as weights, inserted before the blocks (what VPT is as
data, and the semantics: ``nas.modules.vpt_kind``)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from nas.modules.base import LayeredModule
from nas.modules.vpt_kind import VPTKind
from nas.towers.geometry import TokenLayout


class _PromptLayer(nn.Module):
    def __init__(self, dim: int, width: int, bound: float) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(dim, width).uniform_(-bound, bound))


class VPT(VPTKind, LayeredModule):
    slice_axes: ClassVar[dict[str, int | None]] = {"prompts": 0}

    def make_layer(self, dim: int) -> nn.Module:
        g = self.geometry
        bound = math.sqrt(6.0 / (g.in_chans * g.patch_size * g.patch_size + g.width))
        return _PromptLayer(dim, g.width, bound)

    def tokens(self, layer: int, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        dim = self.dim(layer)
        if dim == 0:
            return x
        prompts = self.sliced(layer, dim)["prompts"]
        prompts = F.dropout(prompts, self.options.dropout, self.training)
        return layout.replace(x, self.kind, prompts.unsqueeze(0).expand(x.shape[0], -1, -1))
