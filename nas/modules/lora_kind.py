"""LoRA as data (torch-free; the module with its weights is ``nas.modules.lora``): its targets,
options and costs.

LoRA: a low-rank update of a block's linear layer (Hu et al., 2021). ``lora`` is NOAH's, on
the fused qkv projection; ``lora_proj``, ``lora_fc1`` and ``lora_fc2`` put it on attention's
output projection and the MLP's two layers, each a kind of its own, so that the rank per layer
*and per target* is searched (and PEFT's ``target_modules`` with a ``rank_pattern`` is one
point of the space).

``op(x) + B (A dropout(x))`` with ``A``: in -> r (Kaiming-uniform, like nn.Linear), ``B``:
r -> out (zero init, so a fresh module changes nothing), no alpha/r scaling, as NOAH builds
it. Rank ``r_i`` per layer; the supernet uses ``A[:r]`` and ``B[:, :r]``. Once trained, ``B A``
merges into the frozen weight (zero inference overhead), and the LoRA kinds of a subnet
export together as one PEFT LoRA adapter (same logits, tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from nas.modules.kind import LayeredKind
from nas.modules.options import Options
from nas.towers.geometry import TowerGeometry


def widths(target: str, geometry: TowerGeometry) -> tuple[int, int]:
    """A linear layer's input and output widths."""
    d, h = geometry.width, geometry.mlp_hidden
    return {"qkv": (d, 3 * d), "proj": (d, d), "fc1": (d, h), "fc2": (h, d)}[target]


@dataclass(frozen=True)
class LoRAOptions(Options):
    """LoRA's options: dropout on the input of A (PEFT's ``lora_dropout``)."""

    dropout: float = field(default=0.1, metadata={"below": 1.0})


class LoRAKind(LayeredKind):
    kind = "lora"
    #: the linear layer it updates (its site is that layer's output)
    target: ClassVar[str] = "qkv"
    sites = frozenset({"qkv"})
    noah_key = "LORA_DIM"
    Options = LoRAOptions
    mergeable = True
    peft_type = "LORA"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        cls.sites = frozenset({cls.target})
        super().__init_subclass__(**kwargs)

    @classmethod
    def layer_params(cls, dim: int, geometry: TowerGeometry) -> int:
        return dim * sum(widths(cls.target, geometry))

    @classmethod
    def flops(
        cls, choice: Sequence[int], geometry: TowerGeometry, seq_lens: Sequence[int], merged: bool
    ) -> int:
        if merged:
            return 0
        return sum(
            2 * seq_lens[i] * cls.layer_params(dim, geometry) for i, dim in enumerate(choice)
        )


class LoRAProjKind(LoRAKind):
    kind = "lora_proj"
    target = "proj"
    noah_key = None


class LoRAFc1Kind(LoRAKind):
    kind = "lora_fc1"
    target = "fc1"
    noah_key = None


class LoRAFc2Kind(LoRAKind):
    kind = "lora_fc2"
    target = "fc2"
    noah_key = None
