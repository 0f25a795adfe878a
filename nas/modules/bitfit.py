"""Bias tuning (BitFit, Ben Zaken et al., 2022) as deltas: after each chosen operation of a
block (qkv, proj, fc1, fc2, the LayerNorms), ``out + delta`` per channel, the delta starting at
zero. The frozen biases themselves never change, so the backbone stays frozen and its hash
holds; once trained, a delta folds into the operation's bias (``b' = b + delta``). Per layer the
space offers sets of operations (``nas.modules.vectors``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from nas.modules.vectors import VectorModule, bias_of
from nas.modules.vectors_kind import BitFitKind
from nas.towers.geometry import Weights


class BitFit(BitFitKind, VectorModule):
    vectors: ClassVar[dict[str, Any]] = {"delta": nn.init.zeros_}

    def apply(self, vectors: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        return out + vectors["delta"]

    def fold(self, vectors: dict[str, torch.Tensor], site: str, weights: Weights) -> None:
        bias_of(weights, len(vectors["delta"])).add_(vectors["delta"])
