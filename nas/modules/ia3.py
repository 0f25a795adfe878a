"""IA3 (Liu et al., 2022): learned scalings of a block's activations, as PEFT's ``IA3Config``
applies them to a timm ViT: an operation's output times a vector (``qkv``: keys, values and
queries of the fused projection, ``proj``, ``fc1``), or the MLP's hidden units (``fc2.in``:
what enters fc2, PEFT's ``feedforward_modules``) times a vector, each starting at one. Per
layer the space offers sets of these targets (``nas.modules.vectors``). Once trained, a
scaling folds into the operation's weight (rows for an output, columns for an input) and
bias; ``nas export --format peft`` writes PEFT's IA3 adapter (same logits, tested).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from nas.modules.vectors import VectorModule
from nas.modules.vectors_kind import IA3Kind
from nas.towers.geometry import Weights


class IA3(IA3Kind, VectorModule):
    vectors: ClassVar[dict[str, Any]] = {"scaling": nn.init.ones_}

    def apply(self, vectors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return x * vectors["scaling"]

    def fold(self, vectors: dict[str, torch.Tensor], site: str, weights: Weights) -> None:
        scaling = vectors["scaling"]
        if site.endswith(".in"):  # W (s x) = (W diag(s)) x: the columns
            weights.weight.mul_(scaling)
            return
        weights.weight.mul_(scaling[:, None])
        if weights.bias is not None:
            weights.bias.mul_(scaling)

    def peft_adapter(
        self, name_of: Callable[[int, str], str]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        modules, feedforward, tensors = [], [], {}
        for layer, mask in enumerate(self.active):
            for site in self.targets_of(mask):
                name = name_of(layer, site.removesuffix(".in"))
                scaling = self.on(layer, site)["scaling"]
                modules.append(name)
                if site.endswith(".in"):  # PEFT keeps an input scaling as (1, in)
                    feedforward.append(name)
                    tensors[f"{name}.ia3_l"] = scaling[None, :]
                else:  # and an output scaling as (out, 1)
                    tensors[f"{name}.ia3_l"] = scaling[:, None]
        config = {
            "peft_type": "IA3",
            "target_modules": sorted(modules),
            "feedforward_modules": sorted(feedforward),
            "fan_in_fan_out": False,
            "init_ia3_weights": True,
        }
        return config, tensors
