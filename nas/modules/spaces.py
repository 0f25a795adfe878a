"""The choices of a module kind in a search space, as data: ``ModuleSpace`` (what every kind's
space answers: counts, samples, costs, and its choice as categorical parameters, some of them
conditional on others, which the search algorithms read: ``nas.search.operators``) and
``LayeredSpace`` (a depth, then one dimension per layer: VPT, LoRA, Adapter)."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from nas.modules.options import Options
from nas.towers.geometry import TowerGeometry

Choice = Any  # a kind's plain-data setting; a tuple of per-layer dims for layered kinds


class KindCosts(Protocol):
    """What a space asks of its kind's class (``nas.modules.kind.Kind`` answers it; named here
    structurally, so that this module does not import the kinds' base)."""

    kind: ClassVar[str]

    @classmethod
    def empty_choice(cls) -> Choice: ...
    @classmethod
    def canonical(cls, choice: Choice) -> Choice: ...
    @classmethod
    def params(cls, choice: Choice, geometry: TowerGeometry) -> int: ...


class LayeredCosts(KindCosts, Protocol):
    """A layered kind's class (``nas.modules.kind.LayeredKind``): one dim per layer."""

    @classmethod
    def layer_params(cls, dim: int, geometry: TowerGeometry) -> int: ...


@dataclass(frozen=True)
class Param:
    """One categorical parameter of a kind's choice. ``structural`` ones shape the rest (a
    depth, a mode: NOAH's mutation resamples them with ``s_prob``, the others with ``m_prob``);
    ``when`` makes it conditional: it exists only when true of the values before it. A
    ``latent`` conditional parameter keeps a value while it does not exist (UPT's n_ctx under
    mode ``none``): an evolutionary search carries and mutates it, so that a mode with context
    coming back finds it; Optuna asks it only when it exists."""

    name: str
    values: tuple[Any, ...]
    structural: bool = False
    when: Callable[[Mapping[str, Any]], bool] | None = None
    latent: bool = False

    def active(self, values: Mapping[str, Any]) -> bool:
        return self.when is None or self.when(values)


class ModuleSpace:
    """The choices of one module kind in a search space."""

    kind: str
    module: type[KindCosts]
    options: Options

    def count(self) -> int:
        raise NotImplementedError

    def contains(self, choice: Choice) -> bool:
        raise NotImplementedError

    def sample(self, rng: random.Random) -> Choice:
        """NOAH's supernet sampling distribution."""
        raise NotImplementedError

    def sample_uniform(self, rng: random.Random) -> Choice:
        """A choice drawn uniformly from all of this module's choices."""
        raise NotImplementedError

    def sample_tilted(self, rng: random.Random, tilt: float) -> Choice:
        """NOAH's sampling leaned towards larger (``tilt`` > 0) or smaller (< 0) choices, for
        size-balanced supernet sampling; kinds without an order of sizes sample as NOAH does."""
        return self.sample(rng)

    def choices(self) -> Iterator[Choice]:
        raise NotImplementedError

    def parameters(self) -> list[Param]:
        """The choice as categorical parameters, in order (a conditional one after those its
        condition reads)."""
        raise NotImplementedError

    def encode(self, choice: Choice) -> dict[str, Any]:
        """A choice as the values of its active parameters."""
        raise NotImplementedError

    def decode(self, values: Mapping[str, Any]) -> Choice:
        """The choice that the active parameters' values make."""
        raise NotImplementedError

    def capacity(self) -> Choice:
        """The choice that the supernet allocates (every other choice is a slice of it)."""
        raise NotImplementedError

    def cost_distribution(self, geometry: TowerGeometry) -> Counter[int]:
        """How many choices have each exact trainable-parameter count."""
        raise NotImplementedError

    def smallest(self, geometry: TowerGeometry) -> Choice:
        raise NotImplementedError

    def largest(self, geometry: TowerGeometry) -> Choice:
        raise NotImplementedError

    def to_data(self) -> dict[str, Any]:
        raise NotImplementedError

    def summary(self) -> str:
        """One line for ``nas space show``: the space's axes as its data gives them."""
        return "  ".join(f"{k} {v}" for k, v in self.to_data().items())

    def ladder(self, geometry: TowerGeometry) -> list[Choice]:
        """The choices a budget move sets this kind to (``nas.search.anchors``), smallest
        first: its empty choice when the space holds one, then every choice by size (a kind
        with more than ``LADDER_LIMIT`` choices: its smallest and largest)."""
        empty = self.module.empty_choice()
        if self.count() <= LADDER_LIMIT:
            steps = list(self.choices())
        else:
            steps = [self.smallest(geometry), self.largest(geometry)]
        return _by_size(self.module, geometry, [empty, *steps] if self.contains(empty) else steps)


#: Kinds with at most this many choices list them all on their ladder.
LADDER_LIMIT = 4096


def _by_size(module: type[KindCosts], geometry: TowerGeometry, choices: list) -> list:
    """Distinct choices, fewest trainable parameters first (ties in a fixed order)."""
    unique = {module.canonical(c): None for c in choices}
    return sorted(unique, key=lambda c: (module.params(c, geometry), repr(c)))


def trim(dims: Sequence[int] | None) -> tuple[int, ...]:
    """Canonical per-layer dims: a tuple without trailing zeros."""
    dims = tuple(int(d) for d in dims or ())
    end = len(dims)
    while end and dims[end - 1] == 0:
        end -= 1
    return dims[:end]


def _convolve(a: Counter[int], b: Counter[int]) -> Counter[int]:
    out: Counter[int] = Counter()
    for ka, va in a.items():
        for kb, vb in b.items():
            out[ka + kb] += va * vb
    return out


@dataclass(frozen=True)
class LayeredSpace(ModuleSpace):
    """Choices of a layered kind: a depth from ``depths``, then a dim from ``dims`` per layer.
    ``by_size`` orders the dims by their parameters where their values do not (a vector kind's
    sets, an adapter's positions); empty: by value."""

    module: type[LayeredCosts]
    dims: tuple[int, ...]
    depths: tuple[int, ...]
    max_dim: int
    options: Options = field(default_factory=Options)
    by_size: tuple[int, ...] = ()
    #: with ``by_size``: each entry's rank among the distinct sizes (equal sizes, equal rank)
    size_ranks: tuple[int, ...] = ()

    @property
    def kind(self) -> str:
        return self.module.kind

    def _depth_groups(self) -> list[int]:
        """Depths whose choice sets are disjoint after canonicalisation. With 0 among the dims,
        a shorter depth is a special case of the longest one (zeros at the end)."""
        if 0 in self.dims:
            return [max(self.depths)]
        return list(self.depths)

    def count(self) -> int:
        return sum(len(self.dims) ** d for d in self._depth_groups())

    def contains(self, choice: Sequence[int]) -> bool:
        choice = trim(choice)
        for depth in self.depths:
            if len(choice) > depth:
                continue
            padded = choice + (0,) * (depth - len(choice))
            if all(d in self.dims for d in padded):
                return True
        return False

    def sample(self, rng: random.Random) -> tuple[int, ...]:
        depth = rng.choice(self.depths)
        return trim(rng.choice(self.dims) for _ in range(depth))

    def sample_tilted(self, rng: random.Random, tilt: float) -> tuple[int, ...]:
        """Depth and per-layer dims drawn with weights exp(tilt * rank / (n - 1)) over their
        sorted values: tilt 0 is NOAH's sampling, large positive tilts favour the largest."""
        depth = _tilted_choice(rng, sorted(self.depths), tilt)
        dims = self.ordered_dims()
        ranks = self.size_ranks or None
        return trim(_tilted_choice(rng, dims, tilt, ranks) for _ in range(depth))

    def ordered_dims(self) -> tuple[int, ...]:
        """The dims, fewest parameters first."""
        return self.by_size or tuple(sorted(self.dims))

    def sample_uniform(self, rng: random.Random) -> tuple[int, ...]:
        groups = self._depth_groups()
        depth = rng.choices(groups, weights=[len(self.dims) ** d for d in groups])[0]
        return trim(rng.choice(self.dims) for _ in range(depth))

    def parameters(self) -> list[Param]:
        """The depth, then one dim per layer, each existing only for the layers the depth
        switches on."""
        layers = [
            Param(f"dim{i}", self.dims, when=lambda v, i=i: i < v["depth"])
            for i in range(max(self.depths))
        ]
        return [Param("depth", self.depths, structural=True), *layers]

    def encode(self, choice: Sequence[int]) -> dict[str, Any]:
        """The shortest depth that holds the choice, its dims padded with zeros to it."""
        dims = list(trim(choice))
        if len(dims) > max(self.depths):
            raise ValueError(f"{self.kind} {tuple(dims)}: deeper than the space's depths")
        depth = min(d for d in self.depths if d >= len(dims))
        dims += [0] * (depth - len(dims))
        return {"depth": depth, **{f"dim{i}": d for i, d in enumerate(dims)}}

    def decode(self, values: Mapping[str, Any]) -> tuple[int, ...]:
        return trim(values[f"dim{i}"] for i in range(values["depth"]))

    def choices(self) -> Iterator[tuple[int, ...]]:
        for depth in self._depth_groups():
            for dims in itertools.product(self.dims, repeat=depth):
                yield trim(dims)

    def capacity(self) -> tuple[int, ...]:
        return (self.max_dim,) * max(self.depths)

    def cost_distribution(self, geometry: TowerGeometry) -> Counter[int]:
        per_layer: Counter[int] = Counter(
            self.module.layer_params(d, geometry) if d else 0 for d in self.dims
        )
        total: Counter[int] = Counter()
        for depth in self._depth_groups():
            acc: Counter[int] = Counter({0: 1})
            for _ in range(depth):
                acc = _convolve(acc, per_layer)
            total.update(acc)
        return total

    def smallest(self, geometry: TowerGeometry) -> tuple[int, ...]:
        return trim((self.ordered_dims()[0],) * min(self.depths))

    def largest(self, geometry: TowerGeometry) -> tuple[int, ...]:
        return trim((self.ordered_dims()[-1],) * max(self.depths))

    def ladder(self, geometry: TowerGeometry) -> list[tuple[int, ...]]:
        """The uniform choices, smallest first: one dim on every layer of a depth (and the
        empty choice when a dim of 0 or a depth of 0 allows it)."""
        steps = [(d,) * depth for depth in self.depths for d in self.dims]
        steps = [s for s in steps if self.contains(s)]
        if not self.by_size:
            return _by_size(self.module, geometry, steps)
        # equal sizes in the space's own order of preference (the last is what largest() takes)
        rank = {v: i for i, v in enumerate(self.by_size)}
        unique = {self.module.canonical(s): None for s in steps}
        return sorted(
            unique,
            key=lambda c: (self.module.params(c, geometry), tuple(rank.get(v, -1) for v in c)),
        )

    def to_data(self) -> dict[str, Any]:
        return {
            "dims": list(self.dims),
            "depths": list(self.depths),
            "max_dim": self.max_dim,
            "options": self.options.to_data(),
        }

    def summary(self) -> str:
        opts = ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in self.options.to_data().items()
        )
        line = f"dims {list(self.dims)}  depths {list(self.depths)}  supernet max {self.max_dim}"
        return line + (f"  ({opts})" if opts else "")


def size_order(
    values: Sequence[int], size: Callable[[int], int], tie: Callable[[int], Any] = lambda v: v
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A layered space's ``by_size`` and ``size_ranks``: ``values`` fewest parameters
    (``size``) first, equal sizes ordered by ``tie``, and each one's rank among the distinct
    sizes."""
    ordered = tuple(sorted(values, key=lambda v: (size(v), tie(v))))
    distinct = sorted({size(v) for v in values})
    return ordered, tuple(distinct.index(size(v)) for v in ordered)


def _tilted_choice(
    rng: random.Random, ordered: Sequence[int], tilt: float, ranks: Sequence[int] | None = None
) -> int:
    """One of ``ordered`` (smallest first) drawn with weights exp(tilt * rank / top rank):
    the rank is the position, or ``ranks`` (equal sizes sharing one)."""
    if len(ordered) == 1 or tilt == 0:
        return rng.choice(ordered)
    ranks = list(range(len(ordered))) if ranks is None else list(ranks)
    top = max(ranks) or 1
    return rng.choices(ordered, weights=[math.exp(tilt * r / top) for r in ranks])[0]
