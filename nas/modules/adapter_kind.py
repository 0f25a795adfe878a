"""The adapter as data (torch-free; the module with its weights is ``nas.modules.adapter``):
its per-layer values, space and costs.

Adapter: a bottleneck on a block's branch (Houlsby et al., 2019), as NOAH builds it, with
Adapter+'s choices (Steitz & Roth, CVPR 2024) searchable beside it.

NOAH's adapter acts after each block's MLP: ``h = mlp(norm2(x)); h = h + up(dropout(
QuickGELU(down(h))))``, then the block's own residual: width -> d -> width with biases,
Xavier-uniform weights and N(0, 1e-6) biases. The supernet uses ``down[:d]`` and ``up[:, :d]``
(the output bias is shared by every d > 0).

Per layer, a choice may also set
- the *position*: ``after_mlp`` (NOAH's; Adapter+'s "post" adapter on the MLP's output, with
  its own skip), ``after_attn`` (the same on the attention branch's output: site ``attn``),
  or ``parallel`` (beside the MLP, from the MLP's input: ``h = mlp(z) + up(..down(z))`` with
  ``z = norm2(x)``, He et al. 2022);
- *scaling*: Adapter+'s learned channel-wise scaling of the adapter's output, ``s * up(..)``
  with ``s`` (width) starting at 1, so that a scaled adapter starts where the unscaled one does.
Positions share the layer's weights in the supernet (weight entanglement across positions, as
across dims); a scaled choice uses the layer's ``s`` as well.

A layer's choice is one integer: the dim in the low bits, the position and scaling as flags
above them (``AFTER_ATTN``, ``PARALLEL``, ``SCALED``), so that NOAH's adapter (after the MLP,
unscaled) is the plain dim: a space or subnet without the new choices is unchanged in data and
hash. The supernet's capacity per layer carries the union of the flags its space holds; a
choice fits where its flags are among them. In YAML and when printed, a layer is ``8``,
``8@after_attn``, ``8@parallel``, ``8+scale`` or ``8@parallel+scale``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nas.core.validate import Reader
from nas.core.yamlio import join_key
from nas.modules.kind import LayeredKind
from nas.modules.options import Options
from nas.modules.spaces import LayeredSpace, size_order, trim
from nas.towers.geometry import TowerGeometry

#: The dim's bits of a layer's value; the flags sit above them.
DIM_MASK = (1 << 32) - 1
AFTER_ATTN = 1 << 32
PARALLEL = 1 << 33
SCALED = 1 << 34
#: Positions by name (``after_mlp``: no flag, NOAH's), and the site each acts at.
POSITIONS = {"after_mlp": 0, "after_attn": AFTER_ATTN, "parallel": PARALLEL}
SITE_OF = {0: "mlp", AFTER_ATTN: "attn", PARALLEL: "mlp"}
_LAYER = re.compile(r"^(\d+)(?:@(\w+))?(\+scale)?$")


def dim_of(value: int) -> int:
    return value & DIM_MASK


def position_of(value: int) -> int:
    return value & (AFTER_ATTN | PARALLEL)


def compose(dim: int, position: str = "after_mlp", scaled: bool = False) -> int:
    """A layer's value from its dim, position and scaling (0 stays 0: no adapter)."""
    if dim == 0:
        return 0
    return dim | POSITIONS[position] | (SCALED if scaled else 0)


@dataclass(frozen=True)
class AdapterOptions(Options):
    """The adapter's options: dropout after its activation."""

    dropout: float = field(default=0.1, metadata={"below": 1.0})


@dataclass(frozen=True)
class AdapterSpace(LayeredSpace):
    """An adapter's choices: NOAH's dims and depths, times the positions and scalings the
    space lists (``dims`` holds the composed per-layer values, ``sizes`` the plain dims)."""

    sizes: tuple[int, ...] = ()
    positions: tuple[str, ...] = ("after_mlp",)
    scaling: tuple[bool, ...] = (False,)

    def capacity(self) -> tuple[int, ...]:
        union = 0
        for value in self.dims:
            union |= value & ~DIM_MASK
        return (self.max_dim | union,) * max(self.depths)

    def to_data(self) -> dict[str, Any]:
        data = {**super().to_data(), "dims": list(self.sizes)}
        if self.positions != ("after_mlp",):
            data["positions"] = list(self.positions)
        if self.scaling != (False,):
            data["scaling"] = list(self.scaling)
        return data

    def summary(self) -> str:
        line = super().summary().replace(f"dims {list(self.dims)}", f"dims {list(self.sizes)}")
        if self.positions != ("after_mlp",):
            line += f"  positions [{', '.join(self.positions)}]"
        if self.scaling != (False,):
            line += f"  scaling [{', '.join(str(s).lower() for s in self.scaling)}]"
        return line


class AdapterKind(LayeredKind):
    kind = "adapter"
    sites = frozenset({"mlp", "attn"})
    noah_key = "ADAPTER_DIM"
    Options = AdapterOptions

    # -- a layer's value as data -------------------------------------------------------------
    @classmethod
    def width_of(cls, dim: int) -> int:
        return dim_of(dim)

    @classmethod
    def dim_str(cls, dim: int) -> str:
        # a supernet's capacity may hold several positions: after_attn|parallel
        where = "|".join(n for n, f in POSITIONS.items() if f and dim & f)
        return f"{dim_of(dim)}{'@' + where if where else ''}{'+scale' if dim & SCALED else ''}"

    @classmethod
    def parse_layer(cls, value: Any, reader: Reader, key: str) -> int:
        """``8``, ``8@after_attn``, ``8@parallel``, ``8+scale``, ``8@parallel+scale``."""
        if isinstance(value, int) and not isinstance(value, bool):
            dim = reader.integer(value, key, minimum=0)
            if dim > DIM_MASK:
                reader.fail(key, f"{dim:,} is no adapter dim (at most {DIM_MASK:,})")
            return dim
        match = _LAYER.match(value) if isinstance(value, str) else None
        if match is None or (match[2] is not None and match[2] not in POSITIONS):
            reader.fail(
                key,
                f"{value!r}; expected a dim, optionally with @POSITION ({', '.join(POSITIONS)})"
                " and +scale, e.g. 8@parallel+scale",
            )
        if int(match[1]) > DIM_MASK:
            reader.fail(key, f"{int(match[1]):,} is no adapter dim (at most {DIM_MASK:,})")
        return compose(int(match[1]), match[2] or "after_mlp", match[3] is not None)

    @classmethod
    def parse_choice(cls, value: Any, reader: Reader, key: str) -> tuple[int, ...]:
        """As a layered kind's, each layer's dim written as ``parse_layer`` reads it; or a
        mapping's ``position`` and ``scaling`` applied to every layer."""
        if isinstance(value, list):
            return trim(cls.parse_layer(v, reader, join_key(key, i)) for i, v in enumerate(value))
        if not isinstance(value, dict):
            return super().parse_choice(value, reader, key)
        value = reader.mapping(
            value, key, required=["depth"], optional=["dims", "position", "scaling"]
        )
        position = reader.string(
            value.get("position", "after_mlp"), join_key(key, "position"), choices=POSITIONS
        )
        scaled = value.get("scaling", False)
        if not isinstance(scaled, bool):
            reader.fail(join_key(key, "scaling"), f"{scaled!r}; expected true or false")
        dims = value.get("dims")
        if isinstance(dims, list):
            keys = [join_key(key, f"dims[{i}]") for i in range(len(dims))]
            dims = [cls.parse_layer(d, reader, k) for d, k in zip(dims, keys, strict=True)]
        elif dims is not None:
            dims = cls.parse_layer(dims, reader, join_key(key, "dims"))
        plain = super().parse_choice(
            {k: v for k, v in {"depth": value["depth"], "dims": dims}.items() if v is not None},
            reader,
            key,
        )
        flags = POSITIONS[position] | (SCALED if scaled else 0)
        if flags and any(position_of(v) or v & SCALED for v in plain):
            reader.fail(key, "give position/scaling either per layer in dims or for all, not both")
        return tuple(v | flags if v else 0 for v in plain)

    @classmethod
    def choice_to_data(cls, choice: Sequence[int]) -> dict[str, Any] | None:
        data = super().choice_to_data(choice)
        if data is not None and any(v & ~DIM_MASK for v in data["dims"]):
            data["dims"] = [cls.dim_str(v) if v & ~DIM_MASK else v for v in data["dims"]]
        return data

    @classmethod
    def parse_space(
        cls, value: Any, reader: Reader, key: str, geometry: TowerGeometry
    ) -> AdapterSpace:
        """NOAH's ``dims``, ``depths``, ``max_dim`` and ``options``, and optionally
        ``positions`` (a list of after_mlp, after_attn, parallel; default [after_mlp]) and
        ``scaling`` (a list of false/true; default [false])."""
        extra = ["positions", "scaling"]
        value = reader.mapping(
            value, key, required=["dims", "depths"], optional=["max_dim", "options", *extra]
        )
        base = super().parse_space(
            {k: v for k, v in value.items() if k not in extra}, reader, key, geometry
        )
        positions = _listed(value.get("positions", ["after_mlp"]), reader, key, "positions")
        for i, name in enumerate(positions):
            reader.string(name, join_key(key, f"positions[{i}]"), choices=POSITIONS)
        scaling = _listed(value.get("scaling", [False]), reader, key, "scaling")
        for i, flag in enumerate(scaling):
            if not isinstance(flag, bool):
                reader.fail(join_key(key, f"scaling[{i}]"), f"{flag!r}; expected true or false")
        values = tuple(
            dict.fromkeys(compose(d, p, s) for d in base.dims for p in positions for s in scaling)
        )
        by_size, ranks = size_order(values, lambda v: cls.layer_params(v, geometry), _preference)
        return AdapterSpace(
            cls, values, base.depths, base.max_dim, base.options, by_size, ranks, base.dims,
            positions, scaling,
        )  # fmt: skip

    # -- costs ---------------------------------------------------------------------------------
    @classmethod
    def layer_params(cls, dim: int, geometry: TowerGeometry) -> int:
        hidden, width = dim_of(dim), geometry.width
        if hidden == 0:
            return 0
        return 2 * width * hidden + hidden + width + (width if dim & SCALED else 0)

    @classmethod
    def flops(
        cls, choice: Sequence[int], geometry: TowerGeometry, seq_lens: Sequence[int], merged: bool
    ) -> int:
        # the scaling is element-wise: not counted (nas.space.cost counts matmuls)
        return sum(4 * seq_lens[i] * geometry.width * dim_of(v) for i, v in enumerate(choice))


def _preference(value: int) -> tuple[int, int]:
    """Among choices of equal size, the later ranks as larger: so the largest is Adapter+'s
    own setting (after the MLP, scaled) and the smallest the parallel adapter, unscaled."""
    return (value & SCALED, {PARALLEL: 0, AFTER_ATTN: 1, 0: 2}[position_of(value)])


def _listed(value: Any, reader: Reader, key: str, name: str) -> tuple[Any, ...]:
    if not isinstance(value, list) or not value:
        reader.fail(join_key(key, name), f"expected a non-empty list, got {value!r}")
    return tuple(dict.fromkeys(value))
