"""VPT as data: its options, parameter counts and the tokens it adds (torch-free; the module
with its weights is ``nas.modules.vpt``). VPT: learned prompt tokens (Jia et al., 2022), deep
or shallow.

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

from collections.abc import Sequence
from dataclasses import dataclass, field

from nas.modules.kind import LayeredKind
from nas.modules.options import Options
from nas.towers.geometry import TowerGeometry


@dataclass(frozen=True)
class VPTOptions(Options):
    """VPT's options: dropout on the prompts."""

    dropout: float = field(default=0.0, metadata={"below": 1.0})


class VPTKind(LayeredKind):
    kind = "vpt"
    sites = frozenset({"tokens"})
    noah_key = "VISUAL_PROMPT_DIM"
    Options = VPTOptions

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
