"""VPT: learned prompt tokens (Jia et al., 2022), deep or shallow.

Semantics, following the VPT and NOAH reference code:

- Prompt tokens sit after the prefix tokens (class and register tokens) and before the patch
  tokens, with no positional embedding: ``[CLS, (REG...), P, patches]``.
- A layer ``i`` with dim ``p_i > 0`` removes whatever VPT prompt tokens are in the sequence and
  inserts its own ``p_i`` tokens before block ``i``.
- A layer with dim 0 changes nothing: the prompt tokens already in the sequence (the outputs of
  the previous block at those positions) pass through it. The same holds after the last
  prompted layer: as in VPT's deep prompts when fewer layers than blocks are prompted, the last
  prompts flow on to the end. Before the final norm and the pooling all prompt tokens are
  dropped, so they never enter the pooled representation.
- Shallow VPT is depth 1: prompts inserted before block 0 flow through all blocks.
  (NOAH's code appends prompts after the patch tokens and, after a layer with dim 0, does not
  remove the carried tokens; here a prompted layer always replaces all carried VPT tokens.)
- Init: uniform(-v, v), v = sqrt(6 / (in_chans * patch * patch + width)), VPT's Xavier on the
  patch-embedding fan-in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from nas.modules.base import LayeredModule
from nas.modules.options import Options
from nas.towers.geometry import TokenLayout, TowerGeometry


class _PromptLayer(nn.Module):
    def __init__(self, dim: int, width: int, bound: float) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(dim, width).uniform_(-bound, bound))


@dataclass(frozen=True)
class VPTOptions(Options):
    """VPT's options: dropout on the prompts."""

    dropout: float = field(default=0.0, metadata={"below": 1.0})


class VPT(LayeredModule):
    kind = "vpt"
    sites = frozenset({"tokens"})
    noah_key = "VISUAL_PROMPT_DIM"
    Options = VPTOptions
    slice_axes: ClassVar[dict[str, int | None]] = {"prompts": 0}

    @classmethod
    def layer_params(cls, dim: int, geometry: TowerGeometry) -> int:
        return dim * geometry.width

    @classmethod
    def extra_tokens(cls, choice: Sequence[int], geometry: TowerGeometry) -> list[int]:
        carried, out = 0, []
        for layer in range(geometry.depth):
            dim = choice[layer] if layer < len(choice) else 0
            if dim > 0:
                carried = dim
            out.append(carried)
        return out

    @classmethod
    def flops(
        cls, choice: Sequence[int], geometry: TowerGeometry, seq_lens: Sequence[int], merged: bool
    ) -> int:
        return 0  # no matmul of its own: its tokens' attention and MLP cost is nas.space.cost's

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
