"""SSF: scaling and shifting the features (Lian et al., 2022): after each chosen operation of a
block (qkv, proj, fc1, fc2, the LayerNorms), ``out * scale + shift`` per channel, with
``scale ~ N(1, 0.02)`` and ``shift ~ N(0, 0.02)`` as the paper initialises them. Per layer the
space offers sets of operations (``nas.modules.vectors``); once trained, the scale and shift
fold into the operation's own weight and bias: ``W' = diag(scale) W``, ``b' = scale b + shift``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from nas.modules.vectors import VectorModule, bias_of
from nas.modules.vectors_kind import SSFKind
from nas.towers.geometry import Weights


class SSF(SSFKind, VectorModule):
    vectors: ClassVar[dict[str, Any]] = {
        "scale": lambda t: nn.init.normal_(t, 1.0, 0.02),
        "shift": lambda t: nn.init.normal_(t, 0.0, 0.02),
    }

    def apply(self, vectors: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        return out * vectors["scale"] + vectors["shift"]

    def fold(self, vectors: dict[str, torch.Tensor], site: str, weights: Weights) -> None:
        scale, shift = vectors["scale"], vectors["shift"]
        bias = bias_of(weights, len(scale))
        bias.mul_(scale).add_(shift)
        weight = weights.weight
        weight.mul_(scale.reshape(-1, *([1] * (weight.dim() - 1))))
