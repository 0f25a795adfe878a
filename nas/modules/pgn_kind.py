"""PGN as data (torch-free but for its generators' counts, read off timm's ResNet by
``nas.modules.pgn_generators``; the module with its weights is ``nas.modules.pgn``): its
choices, space and costs.

PGN: input-dependent prompts from a learned token library (Loedeman et al.).

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

from nas.core.validate import Reader
from nas.core.yamlio import join_key
from nas.modules.kind import Kind
from nas.modules.options import Options
from nas.modules.pgn_generators import GENERATORS, generator_flops, generator_params
from nas.modules.spaces import ModuleSpace, Param
from nas.towers.geometry import TowerGeometry

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


class PGNKind(Kind):
    kind = "pgn"
    sites = frozenset({"tokens"})
    invertible = True

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
    module = PGNKind

    @property
    def options(self) -> Options:
        return Options()

    def _axes(self) -> tuple[tuple[Any, ...], ...]:
        return (self.prompts, self.library, self.generators, self.resolutions, self.placements)

    def count(self) -> int:
        return math.prod(len(axis) for axis in self._axes())

    def contains(self, choice: Choice) -> bool:
        choice = PGNKind.canonical(choice)
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
        return dict(zip(self.NAMES, PGNKind.canonical(choice), strict=False))

    def decode(self, values: Mapping[str, Any]) -> Choice:
        return tuple(values[n] for n in self.NAMES)

    def capacity(self) -> tuple[Any, ...]:
        return (max(self.prompts), max(self.library), self.generators)

    def cost_distribution(self, geometry: TowerGeometry) -> Counter[int]:
        return Counter(PGNKind.params(c, geometry) for c in self.choices())

    def smallest(self, geometry: TowerGeometry) -> Choice:
        return min(self.choices(), key=lambda c: (PGNKind.params(c, geometry), c[3]))

    def largest(self, geometry: TowerGeometry) -> Choice:
        return max(self.choices(), key=lambda c: (PGNKind.params(c, geometry), c[3]))

    def to_data(self) -> dict[str, Any]:
        return {
            "prompts": list(self.prompts),
            "library": list(self.library),
            "generators": list(self.generators),
            "resolutions": list(self.resolutions),
            "placement": self.placements[0],
        }
