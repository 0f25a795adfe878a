"""PGN's module: the token library, the generators and their output layers, and the prompts
they make for each image (what PGN is as data, and the semantics: ``nas.modules.pgn_kind``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from nas.modules.base import PromptModule
from nas.modules.options import Options
from nas.modules.pgn_generators import generator_params, make_generator
from nas.modules.pgn_kind import Choice, PGNKind, border_patches
from nas.towers.geometry import TokenLayout, TowerGeometry


class PGN(PGNKind, PromptModule):
    def __init__(
        self,
        geometry: TowerGeometry,
        capacity: Sequence[Any],
        options: Options | Mapping[str, Any] | None = None,
    ) -> None:
        """``capacity``: a choice, or ``(L, M, generators, resolutions)`` with tuples of the
        generator variants and resolutions the weights must serve (a supernet's)."""
        super().__init__()
        prompts, library, generators = int(capacity[0]), int(capacity[1]), capacity[2]
        generators = (generators,) if isinstance(generators, str) else tuple(generators)
        self.geometry = geometry
        self.capacity = (prompts, library, generators)
        self.options = Options.of(options)
        self.library = nn.Parameter(torch.randn(library, geometry.width) * 0.02)
        self.generators = nn.ModuleDict(
            {g: make_generator(g, geometry.in_chans) for g in generators}
        )
        self.outputs = nn.ModuleDict(
            {
                g: nn.Linear(generator_params(g, geometry.in_chans)[1], prompts * library)
                for g in generators
            }
        )
        self.active: Choice = ()

    def holds_exactly(self, choice: Choice) -> bool:
        """A choice names one generator (and a resolution and placement, which hold no
        weights); the module holds exactly it when that is its only generator."""
        if not choice:
            return False
        prompts, library, generator = choice[0], choice[1], choice[2]
        return self.capacity == (prompts, library, (generator,))

    # -- runtime -----------------------------------------------------------------------------
    def fits(self, choice: Choice) -> bool:
        if not choice:
            return True
        prompts, library, generator = choice[:3]
        cap_p, cap_m, generators = self.capacity
        return prompts <= cap_p and library <= cap_m and generator in generators

    def activate(self, choice: Choice) -> None:
        choice = self.canonical(choice)
        if not self.fits(choice):
            raise ValueError(f"pgn: choice {choice} exceeds the allocated capacity {self.capacity}")
        self.active = choice

    def _output(self, generator: str, prompts: int, library: int) -> tuple[torch.Tensor, ...]:
        """The output layer's rows for the first ``prompts`` prompts' first ``library`` logits
        (views: no copy)."""
        cap_p, cap_m, _ = self.capacity
        layer = self.outputs[generator]
        weight = layer.weight.view(cap_p, cap_m, -1)[:prompts, :library]
        bias = layer.bias.view(cap_p, cap_m)[:prompts, :library]
        return weight, bias

    def prompts(self, images: torch.Tensor) -> torch.Tensor:
        """The active choice's prompts for ``images``: (B, L, width)."""
        prompts, library, generator, resolution, _ = self.active
        if images.shape[-1] != resolution or images.shape[-2] != resolution:
            images = F.interpolate(
                images, size=(resolution, resolution), mode="bilinear", align_corners=False
            )
        features = self.generators[generator](images)
        weight, bias = self._output(generator, prompts, library)
        logits = torch.einsum("bf,lmf->blm", features, weight) + bias
        mixing = logits.softmax(dim=-1)
        return mixing @ self.library[:library]

    def tokens(self, layer: int, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        if layer != 0 or not self.active:
            return x
        if layout.images is None:
            raise RuntimeError("pgn needs the input images; the tower did not pass them")
        prompts = self.prompts(layout.images).to(x.dtype)
        if self.active[4] == "tokens":
            return layout.replace(x, self.kind, prompts)
        # border: the prompts take the place of the first L border patches, with those
        # positions' embeddings, exactly as prompt patches pasted into the image would
        where = torch.tensor(border_patches(layout.grid)[: prompts.shape[1]], device=x.device)
        start = layout.num_prefix + layout.num_prompts  # the patches follow any prompt tokens
        x = x.clone()
        x[:, start + where] = prompts + layout.patch_pos[where].to(x.dtype)
        return x

    def export(self, choice: Choice) -> PGN:
        choice = self.canonical(choice)
        if not choice or not self.fits(choice):
            raise ValueError(f"pgn: cannot export {choice} from {self.capacity}")
        prompts, library, generator = choice[:3]
        clone = PGN(self.geometry, choice, self.options)
        clone.to(device=self.library.device, dtype=self.library.dtype)
        with torch.no_grad():
            clone.library.copy_(self.library[:library])
            clone.generators[generator].load_state_dict(self.generators[generator].state_dict())
            weight, bias = self._output(generator, prompts, library)
            clone.outputs[generator].weight.copy_(weight.reshape(prompts * library, -1))
            clone.outputs[generator].bias.copy_(bias.reshape(-1))
        clone.activate(choice)
        clone.train(self.training)
        return clone
