"""What the kinds that put vectors on a block's operations share (SSF's scale and shift,
bias tuning's bias deltas, IA3's scalings): per layer, a *set* of the kind's target sites
(``targets``: SSF's are qkv, proj, fc1, fc2, norm1, norm2; IA3's include ``fc2.in``, the
input of fc2), each carrying vectors of that site's width.

A choice is one integer per layer, a bitmask over the kind's ``targets`` (0: nothing on that
layer), so that the layered machinery (depths, per-layer draws, the search's encodings)
applies as it is; in YAML a layer's set is written ``all``, one target's name, or names joined
by ``+`` (``qkv+fc1``). The supernet allocates, per layer, the union of the space's sets; a
choice uses the vectors of its own set (no slicing: a vector is on or off). Their work is
element-wise, so they add no matmul FLOPs (``nas.space.cost`` counts matmuls only), and what
they compute is affine per channel: every such kind folds into the frozen weights
(``mergeable``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from nas.core.errors import NasError
from nas.core.validate import Reader
from nas.core.yamlio import join_key
from nas.modules.base import LayeredModule
from nas.modules.options import Options
from nas.modules.spaces import LayeredSpace, size_order, trim
from nas.towers.geometry import TowerGeometry, Weights

#: SSF's and bias tuning's targets: after each operation of a block (bit i: ``TARGETS[i]``).
TARGETS = ("qkv", "proj", "fc1", "fc2", "norm1", "norm2")
ALL = (1 << len(TARGETS)) - 1


def width(site: str, geometry: TowerGeometry) -> int:
    """The width of a site's tensor: an operation's output, or (``op.in``) its input."""
    if site == "qkv":
        return 3 * geometry.width
    if site in ("fc1", "fc2.in"):
        return geometry.mlp_hidden
    return geometry.width


@dataclass(frozen=True)
class MaskSpace(LayeredSpace):
    """A vector kind's choices: a depth, then one of the space's operation sets per layer.
    Sets order by their parameters on the space's tower (``by_size``, smallest first), not by
    their bitmask."""

    def to_data(self) -> dict[str, Any]:
        return {
            "targets": [self.module.mask_str(m) if m else "none" for m in self.dims],
            "depths": list(self.depths),
        }

    def summary(self) -> str:
        return f"targets {self.to_data()['targets']}  depths {list(self.depths)}"


class VectorModule(LayeredModule):
    """Shared runtime of the vector kinds. Subclasses set ``targets`` (their sites, in bit
    order) and ``vectors`` (each vector's name and its initialisation, in place), and define
    ``apply`` (what the vectors do to a site's tensor) and ``fold`` (the same folded into the
    operation's frozen weights)."""

    targets: ClassVar[tuple[str, ...]] = TARGETS
    mergeable = True
    vectors: ClassVar[Mapping[str, Callable[[torch.Tensor], Any]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        cls.sites = frozenset(cls.targets)
        super().__init_subclass__(**kwargs)

    # -- sets of targets -----------------------------------------------------------------------
    @classmethod
    def full(cls) -> int:
        return (1 << len(cls.targets)) - 1

    @classmethod
    def targets_of(cls, mask: int) -> tuple[str, ...]:
        return tuple(site for i, site in enumerate(cls.targets) if mask >> i & 1)

    @classmethod
    def bit(cls, site: str) -> int:
        return 1 << cls.targets.index(site)

    @classmethod
    def mask_str(cls, mask: int) -> str:
        """``all``, ``-`` (none), or the targets joined by ``+``."""
        if mask == cls.full():
            return "all"
        return "+".join(cls.targets_of(mask)) or "-"

    @classmethod
    def parse_mask(cls, value: Any, reader: Reader, key: str) -> int:
        """A layer's set: an integer bitmask, ``all``, ``none``, a target, targets joined by
        ``+``, or a list of targets."""
        names = ", ".join(cls.targets)
        if isinstance(value, bool):
            reader.fail(key, f"{value!r}; expected a set of targets ({names})")
        if isinstance(value, int):
            if not 0 <= value <= cls.full():
                reader.fail(key, f"{value} is no set of {names} (0..{cls.full()})")
            return value
        if value == "all":
            return cls.full()
        if value in ("none", "-"):
            return 0
        items = value.split("+") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not items:
            reader.fail(key, f"{value!r}; expected 'all', a target or a list of them")
        mask = 0
        for item in items:
            if item not in cls.targets:
                reader.fail(key, f"{item!r} is not a target of {cls.kind}; expected one of {names}")
            mask |= cls.bit(item)
        return mask

    # -- choices as data -------------------------------------------------------------------
    @classmethod
    def parse_choice(cls, value: Any, reader: Reader, key: str) -> tuple[int, ...]:
        """As a layered kind's, each layer's dim a set (``parse_mask``)."""
        if isinstance(value, dict) and isinstance(value.get("dims"), list):
            keys = [join_key(key, f"dims[{i}]") for i in range(len(value["dims"]))]
            masks = [cls.parse_mask(d, reader, k) for d, k in zip(value["dims"], keys, strict=True)]
            return super().parse_choice({**value, "dims": masks}, reader, key)
        if isinstance(value, dict) and "dims" in value:
            mask = cls.parse_mask(value["dims"], reader, join_key(key, "dims"))
            return super().parse_choice({**value, "dims": mask}, reader, key)
        if isinstance(value, list):
            return trim(cls.parse_mask(v, reader, join_key(key, i)) for i, v in enumerate(value))
        return super().parse_choice(value, reader, key)

    @classmethod
    def choice_to_data(cls, choice: Sequence[int]) -> dict[str, Any] | None:
        data = super().choice_to_data(choice)
        if data is not None:
            data["dims"] = [cls.mask_str(m) if m else 0 for m in data["dims"]]
        return data

    @classmethod
    def width_of(cls, dim: int) -> int:
        return 0  # a set of operations, not a width

    @classmethod
    def dim_str(cls, dim: int) -> str:
        return cls.mask_str(dim) if dim else "0"

    @classmethod
    def parse_space(
        cls, value: Any, reader: Reader, key: str, geometry: TowerGeometry
    ) -> MaskSpace:
        """``{targets: [...sets...], depths: [...]}``: each set ``all``, ``none`` (the layer
        may go without), an operation or a list of them."""
        value = reader.mapping(value, key, required=["targets", "depths"])
        targets = value["targets"]
        if not isinstance(targets, list) or not targets:
            reader.fail(join_key(key, "targets"), "expected a list of operation sets")
        keys = [join_key(key, f"targets[{i}]") for i in range(len(targets))]
        masks = sorted({cls.parse_mask(t, reader, k) for t, k in zip(targets, keys, strict=True)})
        if masks == [0]:
            reader.fail(join_key(key, "targets"), "only 'none': give at least one operation")
        depths = reader.int_choices(value["depths"], join_key(key, "depths"), minimum=0)
        for i, depth in enumerate(depths):
            if depth > geometry.depth:
                reader.fail(
                    join_key(key, f"depths[{i}]"),
                    f"depth {depth} is above the backbone's depth ({geometry.depth} blocks)",
                )
        if depths == (0,):
            reader.fail(
                join_key(key, "depths"), "only 0 (absent): give at least one positive depth"
            )
        union = 0
        for mask in masks:
            union |= mask
        by_size, ranks = size_order(masks, lambda m: cls.layer_params(m, geometry))
        return MaskSpace(cls, tuple(masks), depths, union, Options(), by_size, ranks)

    # -- costs ---------------------------------------------------------------------------------
    @classmethod
    def layer_params(cls, dim: int, geometry: TowerGeometry) -> int:
        return len(cls.vectors) * sum(width(site, geometry) for site in cls.targets_of(dim))

    @classmethod
    def flops(
        cls, choice: Sequence[int], geometry: TowerGeometry, seq_lens: Sequence[int], merged: bool
    ) -> int:
        return 0  # element-wise work only: not counted (nas.space.cost)

    # -- runtime -------------------------------------------------------------------------------
    def make_layer(self, dim: int) -> nn.Module:
        layer = nn.Module()
        for site, (name, init) in itertools.product(self.targets_of(dim), self.vectors.items()):
            tensor = torch.empty(width(site, self.geometry))
            init(tensor)
            setattr(layer, self._name(site, name), nn.Parameter(tensor))
        return layer

    def fits(self, choice: Sequence[int]) -> bool:
        choice = trim(choice)
        return len(choice) <= len(self.capacity) and all(
            d & ~c == 0 for d, c in zip(choice, self.capacity, strict=False)
        )

    @staticmethod
    def _name(site: str, vector: str) -> str:
        """A vector's attribute name: ``qkv_scale``, ``fc2_in_scaling``."""
        return f"{site.replace('.', '_')}_{vector}"

    def sliced(self, layer: int, dim: int) -> dict[str, torch.Tensor]:
        holder = self.layers[str(layer)]
        return {
            self._name(site, name): getattr(holder, self._name(site, name))
            for site in self.targets_of(dim)
            for name in self.vectors
        }

    def on(self, layer: int, site: str) -> dict[str, torch.Tensor] | None:
        """``site``'s vectors at ``layer`` under the active choice (None: not acting there)."""
        if not self.dim(layer) & self.bit(site):
            return None
        holder = self.layers[str(layer)]
        return {name: getattr(holder, self._name(site, name)) for name in self.vectors}

    def site_out(self, layer: int, op: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        vectors = self.on(layer, op)
        return out if vectors is None else self.apply(vectors, out)

    def site_in(self, layer: int, op: str, x: torch.Tensor) -> torch.Tensor:
        vectors = self.on(layer, f"{op}.in")
        return x if vectors is None else self.apply(vectors, x)

    def apply(self, vectors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """What the vectors make of a site's tensor."""
        raise NotImplementedError

    def fold(self, vectors: dict[str, torch.Tensor], site: str, weights: Weights) -> None:
        """The same folded into the frozen weights of the site's operation."""
        raise NotImplementedError

    def merge_into(self, operation: Callable[[int, str], Weights], *, inputs: bool) -> None:
        for layer in range(len(self.active)):
            for site in (s for s in self.targets if s.endswith(".in") == inputs):
                vectors = self.on(layer, site)
                if vectors is not None:
                    self.fold(vectors, site, operation(layer, site.removesuffix(".in")))


def bias_of(weights: Weights, width: int) -> torch.Tensor:
    """The operation's bias, created (zero, frozen) where it has none: a timm layer built
    with ``bias=False`` gets one to fold into."""
    if weights.bias is None:
        if not isinstance(weights, nn.Module):
            raise NasError(f"{type(weights).__name__} has no bias to fold vectors into")
        reference = weights.weight
        weights.bias = nn.Parameter(
            torch.zeros(width, device=reference.device, dtype=reference.dtype),
            requires_grad=False,
        )
    return weights.bias
