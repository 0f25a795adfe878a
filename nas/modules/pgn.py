"""PGN: input-dependent prompts from a learned token library (Loedeman et al.).

A small generator network (a timm ResNet) reads the image at its own resolution and outputs
``L x M`` logits; a softmax over the library gives each of the ``L`` prompts its mixing
weights, and the prompts are those mixtures of the ``M`` library tokens (vectors of the
backbone's width, init N(0, 0.02)). They join the sequence once, before block 0, after the
positional embedding and without one of their own, and flow through every block; like all
prompt tokens they are dropped before the final norm and the pooling.

Where they sit: in the prompt region after the prefix tokens, after any VPT tokens (modules
act in registry order). Attention without positional embeddings is permutation-equivariant,
so the position changes no output; the reference code appends them at the end.

A choice is ``(L, M, generator, resolution)``. Weight entanglement: the supernet holds the
largest library and, per generator variant, the largest output layer; a choice uses
``library[:M]`` and the output rows of the first ``L`` prompts' first ``M`` logits. Generator
variants are separate weights, chosen categorically; the resolution only resizes the input.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from nas.core.validate import Reader
from nas.core.yamlio import join_key
from nas.modules.base import PromptModule
from nas.modules.options import Options
from nas.modules.pgn_generators import GENERATORS, generator_flops, generator_params, make_generator
from nas.modules.spaces import ModuleSpace, Param
from nas.towers.geometry import TokenLayout, TowerGeometry

Choice = tuple  # (prompts L, library M, generator, resolution, placement); () when absent

#: where the prompts go: extra tokens (the paper's), or over the patches of the image's border
#: (what an unmodified model can be given as pixels: see ``nas.interop.inversion``)
PLACEMENTS = ("tokens", "border")


def border_patches(grid: tuple[int, int]) -> list[int]:
    """Indices (raster order in the patch grid) of the border patches, clockwise from the top
    left: the positions that ``border`` placement gives the prompts, in order."""
    rows, cols = grid
    ring = [(0, c) for c in range(cols)] + [(r, cols - 1) for r in range(1, rows)]
    ring += [(rows - 1, c) for c in range(cols - 2, -1, -1)] if rows > 1 else []
    ring += [(r, 0) for r in range(rows - 2, 0, -1)] if cols > 1 else []
    return [r * cols + c for r, c in ring]


class PGN(PromptModule):
    kind = "pgn"
    sites = frozenset({"tokens"})
    invertible = True

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

    # -- choices as data -------------------------------------------------------------------
    @classmethod
    def empty_choice(cls) -> Choice:
        return ()

    @classmethod
    def canonical(cls, choice: Sequence[Any]) -> Choice:
        if not choice or int(choice[0]) == 0:
            return ()
        placement = str(choice[4]) if len(choice) > 4 else "tokens"
        return (int(choice[0]), int(choice[1]), str(choice[2]), int(choice[3]), placement)

    @classmethod
    def parse_choice(cls, value: Any, reader: Reader, key: str) -> Choice:
        """``{prompts: L, library: M, generator: resnet10, resolution: 28, placement: tokens}``
        (placement optional), or null."""
        if value is None:
            return ()
        value = reader.mapping(
            value,
            key,
            required=["prompts", "library", "generator", "resolution"],
            optional=["placement"],
        )
        prompts = reader.integer(value["prompts"], join_key(key, "prompts"), minimum=1)
        library = reader.integer(value["library"], join_key(key, "library"), minimum=1)
        generator = _generator_name(reader, value["generator"], join_key(key, "generator"))
        resolution = reader.integer(value["resolution"], join_key(key, "resolution"), minimum=1)
        placement = _placement(reader, value.get("placement", "tokens"), join_key(key, "placement"))
        return (prompts, library, generator, resolution, placement)

    @classmethod
    def choice_to_data(cls, choice: Choice) -> dict[str, Any] | None:
        if not choice:
            return None
        prompts, library, generator, resolution, placement = choice
        return {
            "prompts": prompts,
            "library": library,
            "generator": generator,
            "resolution": resolution,
            "placement": placement,
        }

    @classmethod
    def choice_str(cls, choice: Choice) -> str:
        if not choice:
            return "-"
        prompts, library, generator, resolution, placement = choice
        where = "" if placement == "tokens" else f"/{placement}"
        return f"{prompts}of{library}/{generator}@{resolution}{where}"

    @classmethod
    def parse_space(cls, value: Any, reader: Reader, key: str, geometry: TowerGeometry) -> PGNSpace:
        value = reader.mapping(
            value,
            key,
            required=["prompts", "library"],
            optional=["generators", "resolutions", "placement"],
        )
        prompts = reader.int_choices(value["prompts"], join_key(key, "prompts"), minimum=1)
        placement = _placement(reader, value.get("placement", "tokens"), join_key(key, "placement"))
        border = len(border_patches(geometry.grid))
        if placement == "border" and max(prompts) > border:
            reader.fail(
                join_key(key, "prompts"),
                f"{max(prompts)} prompts do not fit on the image's border ({border} patches of "
                f"a {geometry.grid[0]}x{geometry.grid[1]} grid); use at most {border}, or "
                "placement: tokens",
            )
        library = reader.int_choices(value["library"], join_key(key, "library"), minimum=1)
        names = value.get("generators", ["resnet10"])
        if not isinstance(names, list) or not names:
            reader.fail(join_key(key, "generators"), "expected a non-empty list of generators")
        generators = tuple(
            sorted(
                {
                    _generator_name(reader, v, join_key(key, f"generators[{i}]"))
                    for i, v in enumerate(names)
                }
            )
        )
        image = geometry.image_size
        resolutions = reader.int_choices(
            value.get("resolutions", [image]), join_key(key, "resolutions"), minimum=1
        )
        return PGNSpace(prompts, library, generators, resolutions, (placement,))

    # -- costs -------------------------------------------------------------------------------
    @classmethod
    def params(cls, choice: Choice, geometry: TowerGeometry) -> int:
        if not choice:
            return 0
        prompts, library, generators = choice[0], choice[1], choice[2]
        total = library * geometry.width
        # a supernet's capacity holds every generator variant, each with its output layer
        for generator in (generators,) if isinstance(generators, str) else generators:
            gen, features = generator_params(generator, geometry.in_chans)
            total += gen + (features + 1) * prompts * library
        return total

    @classmethod
    def extra_tokens(cls, choice: Choice, geometry: TowerGeometry) -> list[int]:
        added = choice[0] if choice and choice[4] == "tokens" else 0
        return [added] * geometry.depth

    @classmethod
    def flops(
        cls, choice: Choice, geometry: TowerGeometry, seq_lens: Sequence[int], merged: bool
    ) -> int:
        """The generator, its output layer and the mixture of the library; the blocks' cost
        of the extra tokens is counted by ``nas.space.cost``."""
        if not choice:
            return 0
        prompts, library, generator, resolution, _ = choice
        features = generator_params(generator, geometry.in_chans)[1]
        return (
            generator_flops(generator, geometry.in_chans, resolution)
            + 2 * features * prompts * library
            + 2 * prompts * library * geometry.width
        )

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


def _placement(reader: Reader, value: Any, key: str) -> str:
    if value not in PLACEMENTS:
        reader.fail(key, f"{value!r} is not a placement; expected one of: {', '.join(PLACEMENTS)}")
    return value


def _generator_name(reader: Reader, value: Any, key: str) -> str:
    if not isinstance(value, str) or value not in GENERATORS:
        reader.fail(key, f"{value!r} is not a generator; expected one of: {', '.join(GENERATORS)}")
    return value


@dataclass(frozen=True)
class PGNSpace(ModuleSpace):
    """PGN's choices: prompts L, library size M, generator variant, generator resolution."""

    prompts: tuple[int, ...]
    library: tuple[int, ...]
    generators: tuple[str, ...]
    resolutions: tuple[int, ...]
    placements: tuple[str, ...] = ("tokens",)

    kind = "pgn"
    module = PGN

    @property
    def options(self) -> Options:
        return Options()

    def _axes(self) -> tuple[tuple[Any, ...], ...]:
        return (self.prompts, self.library, self.generators, self.resolutions, self.placements)

    def count(self) -> int:
        return math.prod(len(axis) for axis in self._axes())

    def contains(self, choice: Choice) -> bool:
        choice = PGN.canonical(choice)
        return bool(choice) and all(v in axis for v, axis in zip(choice, self._axes(), strict=True))

    def sample(self, rng: random.Random) -> Choice:
        return tuple(rng.choice(axis) for axis in self._axes())

    def sample_uniform(self, rng: random.Random) -> Choice:
        return self.sample(rng)  # every choice is equally likely already

    def choices(self) -> Iterator[Choice]:
        yield from itertools.product(*self._axes())

    NAMES = ("prompts", "library", "generator", "resolution", "placement")

    def parameters(self) -> list[Param]:
        """L, M, generator, resolution and placement: independent of each other."""
        return [Param(n, axis) for n, axis in zip(self.NAMES, self._axes(), strict=True)]

    def encode(self, choice: Choice) -> dict[str, Any]:
        return dict(zip(self.NAMES, PGN.canonical(choice), strict=False))

    def decode(self, values: Mapping[str, Any]) -> Choice:
        return tuple(values[n] for n in self.NAMES)

    def capacity(self) -> tuple[Any, ...]:
        return (max(self.prompts), max(self.library), self.generators)

    def cost_distribution(self, geometry: TowerGeometry) -> Counter[int]:
        return Counter(PGN.params(c, geometry) for c in self.choices())

    def smallest(self, geometry: TowerGeometry) -> Choice:
        return min(self.choices(), key=lambda c: (PGN.params(c, geometry), c[3]))

    def largest(self, geometry: TowerGeometry) -> Choice:
        return max(self.choices(), key=lambda c: (PGN.params(c, geometry), c[3]))

    def to_data(self) -> dict[str, Any]:
        return {
            "prompts": list(self.prompts),
            "library": list(self.library),
            "generators": list(self.generators),
            "resolutions": list(self.resolutions),
            "placement": self.placements[0],
        }
