"""What every prompt module kind provides, and the shared base of the layered kinds.

A module *kind* is one ``PromptModule`` subclass. The class itself answers questions about
*choices* (a subnet's setting of that module, plain data) without building anything: parsing,
canonical form, exact trainable parameters, added FLOPs, and its search space. An instance
holds weights at some *capacity* (the supernet's maxima, or exactly one subnet's sizes for a
standalone model), is switched to a choice with ``activate`` (bookkeeping only: no allocation,
no copy), and acts at the tower sites it names in ``sites`` (see ``nas.towers``).

The layered kinds (VPT, LoRA, Adapter) share ``LayeredModule``: a choice is one dimension per
layer for layers ``0..depth-1`` (0 = absent on that layer); its canonical form is the tuple of
per-layer dims with trailing zeros removed, so nothing is recorded beyond the depth. Weights are
allocated once per layer at the capacity's dimension and a choice uses leading slices of them.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from nas.backbone import TowerGeometry
from nas.towers import TokenLayout
from nas.validate import Reader
from nas.yamlio import join_key

Choice = Any  # a kind's plain-data setting; a tuple of per-layer dims for layered kinds


class PromptModule(nn.Module):
    """Base class of prompt module kinds. Subclasses set ``kind``, ``sites`` and ``options``."""

    kind: ClassVar[str]
    sites: ClassVar[frozenset[str]] = frozenset()
    #: module hyper-parameters settable in YAML (``options:``), with their defaults
    options: ClassVar[Mapping[str, float]] = {}

    # -- choices as data -------------------------------------------------------------------
    @classmethod
    def empty_choice(cls) -> Choice:
        raise NotImplementedError

    @classmethod
    def canonical(cls, choice: Choice) -> Choice:
        raise NotImplementedError

    @classmethod
    def parse_choice(cls, value: Any, reader: Reader, key: str) -> Choice:
        raise NotImplementedError

    @classmethod
    def choice_to_data(cls, choice: Choice) -> Any:
        raise NotImplementedError

    @classmethod
    def choice_str(cls, choice: Choice) -> str:
        raise NotImplementedError

    @classmethod
    def parse_space(
        cls, value: Any, reader: Reader, key: str, geometry: TowerGeometry
    ) -> ModuleSpace:
        raise NotImplementedError

    # -- costs, without building a model -----------------------------------------------------
    @classmethod
    def params(cls, choice: Choice, geometry: TowerGeometry) -> int:
        """Exact number of trainable parameters of ``choice``."""
        raise NotImplementedError

    @classmethod
    def extra_tokens(cls, choice: Choice, geometry: TowerGeometry) -> list[int]:
        """Prompt tokens this choice adds to the sequence entering each block."""
        return [0] * geometry.depth

    @classmethod
    def flops(
        cls, choice: Choice, geometry: TowerGeometry, seq_lens: Sequence[int], merged: bool
    ) -> int:
        """FLOPs of the module's own matmuls for one image, given each block's sequence length
        (attention/MLP cost of extra tokens is counted by ``nas.cost``)."""
        return 0

    # -- runtime -----------------------------------------------------------------------------
    def activate(self, choice: Choice) -> None:
        raise NotImplementedError

    def export(self, choice: Choice) -> PromptModule:
        """A new module whose capacity is exactly ``choice``, holding copies of its slices."""
        raise NotImplementedError

    def holds_exactly(self, choice: Choice) -> bool:
        """Whether this module's weights are exactly ``choice``'s (it is what ``export`` of
        that choice would give), so that saving needs no export."""
        return getattr(self, "capacity", None) == choice

    def tokens(self, layer: int, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        return x

    def qkv_delta(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def mlp_out(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return h


class ModuleSpace:
    """The choices of one module kind in a search space."""

    kind: str
    module: type[PromptModule]
    options: dict[str, float]

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

    def mutate(self, choice: Choice, rng: random.Random, m_prob: float, s_prob: float) -> Choice:
        """NOAH/AutoFormer mutation of one module's choice."""
        raise NotImplementedError

    def suggest(self, trial: Any, prefix: str) -> Choice:
        """The choice as Optuna parameters (conditional ones where the choice is structured)."""
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


# ---------------------------------------------------------------------------------------------
# Layered kinds: depth + one dimension per layer
# ---------------------------------------------------------------------------------------------


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


class LayeredModule(PromptModule):
    """Shared runtime of kinds whose choice is one dimension per layer.

    Subclasses define ``layer_params(dim, geometry)``, ``make_layer(dim)`` returning a module
    that holds one layer's weights at ``dim``, and ``slice_axes``: for each parameter name of
    that layer module, the axis sliced to a smaller dim (None: not sliced)."""

    slice_axes: ClassVar[Mapping[str, int | None]] = {}

    def __init__(
        self, geometry: TowerGeometry, capacity: Sequence[int], options: Mapping[str, float]
    ) -> None:
        super().__init__()
        capacity = trim(capacity)
        if len(capacity) > geometry.depth:
            raise ValueError(
                f"{self.kind}: capacity has {len(capacity)} layers, tower has {geometry.depth}"
            )
        self.geometry = geometry
        self.capacity = capacity
        self.config = {**self.options, **dict(options)}
        # Layers with capacity 0 hold no weights at all.
        self.layers = nn.ModuleDict(
            {str(i): self.make_layer(dim) for i, dim in enumerate(capacity) if dim > 0}
        )
        self.active: tuple[int, ...] = ()

    # -- choices as data -------------------------------------------------------------------
    @classmethod
    def empty_choice(cls) -> tuple[int, ...]:
        return ()

    @classmethod
    def canonical(cls, choice: Sequence[int]) -> tuple[int, ...]:
        return trim(choice)

    @classmethod
    def parse_choice(cls, value: Any, reader: Reader, key: str) -> tuple[int, ...]:
        """``{depth: d, dims: [..d ints..]}``, ``{depth: d, dims: k}`` (k on every layer), a
        plain list of per-layer dims, or null / ``{depth: 0}`` for absent."""
        if value is None:
            return ()
        if isinstance(value, list):
            return trim(reader.integer(v, join_key(key, i), minimum=0) for i, v in enumerate(value))
        value = reader.mapping(value, key, required=["depth"], optional=["dims"])
        depth = reader.integer(value["depth"], join_key(key, "depth"), minimum=0)
        if depth == 0:
            return ()
        if "dims" not in value:
            reader.fail(key, "missing required key 'dims' (one per layer, or one for all)")
        dims = value["dims"]
        if isinstance(dims, list):
            if len(dims) != depth:
                reader.fail(
                    join_key(key, "dims"),
                    f"has {len(dims)} entries but depth is {depth}; give one dim per layer",
                )
            return trim(
                reader.integer(v, join_key(key, f"dims[{i}]"), minimum=0)
                for i, v in enumerate(dims)
            )
        dim = reader.integer(dims, join_key(key, "dims"), minimum=0)
        return trim((dim,) * depth)

    @classmethod
    def choice_to_data(cls, choice: Sequence[int]) -> dict[str, Any] | None:
        choice = trim(choice)
        if not choice:
            return None
        return {"depth": len(choice), "dims": list(choice)}

    @classmethod
    def choice_str(cls, choice: Sequence[int]) -> str:
        choice = trim(choice)
        if not choice:
            return "-"
        if len(set(choice)) == 1:
            return f"{choice[0]}x{len(choice)}"
        return "[" + ",".join(map(str, choice)) + "]"

    @classmethod
    def parse_space(
        cls, value: Any, reader: Reader, key: str, geometry: TowerGeometry
    ) -> LayeredSpace:
        value = reader.mapping(
            value, key, required=["dims", "depths"], optional=["max_dim", "options"]
        )
        dims = reader.int_choices(value["dims"], join_key(key, "dims"), minimum=0)
        depths = reader.int_choices(value["depths"], join_key(key, "depths"), minimum=0)
        if dims == (0,):
            reader.fail(join_key(key, "dims"), "only 0 (absent): give at least one positive dim")
        for i, depth in enumerate(depths):
            if depth > geometry.depth:
                reader.fail(
                    join_key(key, f"depths[{i}]"),
                    f"depth {depth} is above the backbone's depth ({geometry.depth} blocks)",
                )
        limit = 4 * geometry.width  # a module wider than that adds more than it saves
        for i, dim in enumerate(dims):
            if dim > limit:
                reader.fail(
                    join_key(key, f"dims[{i}]"),
                    f"dim {dim:,} is above 4 x the backbone's width ({geometry.width}): "
                    f"expected at most {limit:,} (a supernet that wide is not "
                    "parameter-efficient, and may not fit in memory)",
                )
        max_dim = max(dims)
        if "max_dim" in value:
            max_dim = reader.integer(value["max_dim"], join_key(key, "max_dim"), minimum=1)
            if max_dim > limit:
                reader.fail(
                    join_key(key, "max_dim"),
                    f"{max_dim:,} is above 4 x the backbone's width ({geometry.width}): "
                    f"expected at most {limit:,}",
                )
            for i, dim in enumerate(dims):
                if dim > max_dim:
                    reader.fail(
                        join_key(key, f"dims[{i}]"),
                        f"dim {dim} is above the supernet maximum max_dim={max_dim}",
                    )
        options = dict(cls.options)
        if "options" in value:
            given = reader.mapping(
                value["options"], join_key(key, "options"), optional=list(cls.options)
            )
            for name, v in given.items():
                options[name] = reader.number(v, join_key(key, f"options.{name}"), minimum=0.0)
                if name == "dropout" and options[name] >= 1.0:
                    reader.fail(join_key(key, "options.dropout"), f"{v} must be below 1")
        return LayeredSpace(cls, dims, depths, max_dim, options)

    # -- costs ---------------------------------------------------------------------------------
    @classmethod
    def layer_params(cls, dim: int, geometry: TowerGeometry) -> int:
        raise NotImplementedError

    @classmethod
    def params(cls, choice: Sequence[int], geometry: TowerGeometry) -> int:
        return sum(cls.layer_params(d, geometry) for d in choice if d > 0)

    # -- runtime -------------------------------------------------------------------------------
    def make_layer(self, dim: int) -> nn.Module:
        raise NotImplementedError

    def fits(self, choice: Sequence[int]) -> bool:
        """Whether ``choice`` is a slice of the allocated capacity."""
        choice = trim(choice)
        return len(choice) <= len(self.capacity) and all(
            d <= c for d, c in zip(choice, self.capacity, strict=False)
        )

    def activate(self, choice: Sequence[int]) -> None:
        choice = trim(choice)
        if not self.fits(choice):
            raise ValueError(
                f"{self.kind}: choice {list(choice)} exceeds the allocated capacity "
                f"{list(self.capacity)}"
            )
        self.active = choice

    def dim(self, layer: int) -> int:
        """The active dimension at ``layer`` (0 = absent)."""
        return self.active[layer] if layer < len(self.active) else 0

    def sliced(self, layer: int, dim: int) -> dict[str, torch.Tensor]:
        """Views of ``layer``'s weights at ``dim`` (leading slices: no copy)."""
        holder = self.layers[str(layer)]
        out = {}
        for name, axis in self.slice_axes.items():
            tensor = getattr(holder, name)
            out[name] = tensor if axis is None else tensor.narrow(axis, 0, dim)
        return out

    def export(self, choice: Sequence[int]) -> LayeredModule:
        choice = trim(choice)
        if not self.fits(choice):
            raise ValueError(
                f"{self.kind}: cannot export {list(choice)} from {list(self.capacity)}"
            )
        clone = type(self)(self.geometry, choice, self.config)
        reference = next(self.parameters(), None)
        if reference is not None:  # the copy lives where the source does (device and dtype)
            clone.to(device=reference.device, dtype=reference.dtype)
        with torch.no_grad():
            for layer, dim in enumerate(choice):
                if dim == 0:
                    continue
                target = clone.layers[str(layer)]
                for name, view in self.sliced(layer, dim).items():
                    getattr(target, name).copy_(view)
        clone.activate(choice)
        return clone


@dataclass(frozen=True)
class LayeredSpace(ModuleSpace):
    """Choices of a layered kind: a depth from ``depths``, then a dim from ``dims`` per layer."""

    module: type[LayeredModule]
    dims: tuple[int, ...]
    depths: tuple[int, ...]
    max_dim: int
    options: dict[str, float] = field(default_factory=dict)

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
        dims = sorted(self.dims)
        return trim(_tilted_choice(rng, dims, tilt) for _ in range(depth))

    def sample_uniform(self, rng: random.Random) -> tuple[int, ...]:
        groups = self._depth_groups()
        depth = rng.choices(groups, weights=[len(self.dims) ** d for d in groups])[0]
        return trim(rng.choice(self.dims) for _ in range(depth))

    def mutate(
        self, choice: Sequence[int], rng: random.Random, m_prob: float, s_prob: float
    ) -> tuple[int, ...]:
        """With probability ``s_prob`` a new depth (kept layers keep their dims, new layers get
        random ones); then each layer's dim is resampled with probability ``m_prob``."""
        dims = list(trim(choice))
        depth = min((d for d in self.depths if d >= len(dims)), default=len(dims))
        dims += [0] * (depth - len(dims))
        if rng.random() < s_prob:
            depth = rng.choice(self.depths)
            dims = dims[:depth] + [rng.choice(self.dims) for _ in range(depth - len(dims))]
        dims = [rng.choice(self.dims) if rng.random() < m_prob else d for d in dims]
        return trim(dims)

    def suggest(self, trial: Any, prefix: str) -> tuple[int, ...]:
        """Depth first, then one dim per active layer: the layer parameters exist only for the
        layers the depth switches on (Optuna's conditional, define-by-run parameters)."""
        depth = trial.suggest_categorical(f"{prefix}depth", list(self.depths))
        return trim(
            trial.suggest_categorical(f"{prefix}dim{i}", list(self.dims)) for i in range(depth)
        )

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
        return trim((min(self.dims),) * min(self.depths))

    def largest(self, geometry: TowerGeometry) -> tuple[int, ...]:
        return trim((max(self.dims),) * max(self.depths))

    def to_data(self) -> dict[str, Any]:
        return {
            "dims": list(self.dims),
            "depths": list(self.depths),
            "max_dim": self.max_dim,
            "options": dict(self.options),
        }


def _tilted_choice(rng: random.Random, ordered: Sequence[int], tilt: float) -> int:
    if len(ordered) == 1 or tilt == 0:
        return rng.choice(ordered)
    n = len(ordered) - 1
    return rng.choices(ordered, weights=[math.exp(tilt * i / n) for i in range(n + 1)])[0]
