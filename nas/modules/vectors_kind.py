"""The vector kinds as data (torch-free; their modules with weights are ``nas.modules.vectors``,
``ssf``, ``bitfit`` and ``ia3``): sets of targets per layer, their spaces and costs.

What the kinds that put vectors on a block's operations share (SSF's scale and shift,
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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from nas.core.validate import Reader
from nas.core.yamlio import join_key
from nas.modules.kind import LayeredKind
from nas.modules.options import Options
from nas.modules.spaces import LayeredSpace, size_order, trim
from nas.towers.geometry import TowerGeometry

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


class VectorKind(LayeredKind):
    """What the vector kinds share as data. Subclasses set ``targets`` (their sites, in bit
    order) and ``vector_names`` (the vectors each target carries)."""

    targets: ClassVar[tuple[str, ...]] = TARGETS
    vector_names: ClassVar[tuple[str, ...]] = ()
    mergeable = True

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
        return len(cls.vector_names) * sum(width(site, geometry) for site in cls.targets_of(dim))

    @classmethod
    def flops(
        cls, choice: Sequence[int], geometry: TowerGeometry, seq_lens: Sequence[int], merged: bool
    ) -> int:
        return 0  # element-wise work only: not counted (nas.space.cost)


class SSFKind(VectorKind):
    """SSF (``nas.modules.ssf``): a scale and a shift per channel of each target."""

    kind = "ssf"
    vector_names = ("scale", "shift")


class BitFitKind(VectorKind):
    """Bias tuning (``nas.modules.bitfit``): a bias delta per channel of each target."""

    kind = "bitfit"
    vector_names = ("delta",)


class IA3Kind(VectorKind):
    """IA3 (``nas.modules.ia3``): a scaling per channel of each target."""

    kind = "ia3"
    targets = ("qkv", "proj", "fc1", "fc2.in")
    vector_names = ("scaling",)
    peft_type = "IA3"
