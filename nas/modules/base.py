"""What every prompt module kind provides, and the shared base of the layered kinds.

A module *kind* is one ``PromptModule`` subclass. The class itself answers questions about
*choices* (a subnet's setting of that module, plain data) without building anything: parsing,
canonical form, exact trainable parameters, added FLOPs, and its search space. An instance
holds weights at some *capacity* (the supernet's maxima, or exactly one subnet's sizes for a
standalone model), is switched to a choice with ``activate`` (bookkeeping only: no allocation,
no copy), and acts at the tower sites it names in ``sites`` (``nas.towers.geometry.SITES``:
the token sequence, and the input or output of a block's qkv, proj, fc1, fc2, LayerNorms and
MLP). A kind owns its capabilities: where it acts, whether it folds into the frozen weights
(``mergeable``, ``merge_into``), its options and their defaults; no code outside
``nas.modules`` names a kind.

The layered kinds (VPT, LoRA, Adapter) share ``LayeredModule``: a choice is one dimension per
layer for layers ``0..depth-1`` (0 = absent on that layer); its canonical form is the tuple of
per-layer dims with trailing zeros removed, so nothing is recorded beyond the depth. Weights are
allocated once per layer at the capacity's dimension and a choice uses leading slices of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from nas.core.validate import Reader
from nas.core.yamlio import join_key
from nas.modules.options import Options
from nas.modules.spaces import Choice, LayeredSpace, ModuleSpace, trim
from nas.towers.geometry import SITES, TokenLayout, TowerGeometry, Weights


class PromptModule(nn.Module):
    """Base class of prompt module kinds. Subclasses set ``kind`` and ``sites``, and
    ``Options`` where they have hyper-parameters."""

    kind: ClassVar[str]
    #: where the kind acts (``nas.towers.geometry.SITES``)
    sites: ClassVar[frozenset[str]] = frozenset()
    #: the kind's hyper-parameters settable in YAML (``options:``), with their defaults
    Options: ClassVar[type[Options]] = Options
    #: whether a trained choice folds into the frozen weights (``merge_into``)
    mergeable: ClassVar[bool] = False
    #: the PEFT method a trained choice exports to (``peft_adapter``), or None
    peft_type: ClassVar[str | None] = None
    #: whether the kind prompts a CLIP's text tower (``text_context``; at most one per model)
    text_side: ClassVar[bool] = False
    #: whether its prompts can be carried by the input image itself (prompt inversion:
    #: ``nas.interop.inversion``)
    invertible: ClassVar[bool] = False
    #: the key of NOAH's RETRAIN config that sets this kind's per-block dims (None: not NOAH's)
    noah_key: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = sorted(set(cls.sites) - SITES)
        if unknown:
            raise TypeError(
                f"{cls.__name__}.sites names {unknown}, which no tower has; the sites are "
                f"{', '.join(sorted(SITES))}"
            )

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
        (attention/MLP cost of extra tokens is counted by ``nas.space.cost``). Every kind states its
        own, 0 included: a kind that forgot would otherwise look free to a FLOPs budget."""
        raise NotImplementedError(f"{cls.__name__}.flops")

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
        """The token sequence entering block ``layer`` (site ``tokens``)."""
        return x

    def site_in(self, layer: int, op: str, x: torch.Tensor) -> torch.Tensor:
        """What enters operation ``op`` of block ``layer`` (site ``op.in``)."""
        return x

    def site_out(self, layer: int, op: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """What operation ``op`` of block ``layer`` gives, from its input ``x`` and its
        output ``out`` (site ``op``)."""
        return out

    def merge_into(self, operation: Callable[[int, str], Weights], *, inputs: bool) -> None:
        """Fold the active choice into the frozen weights (``operation(layer, op)``: block
        ``layer``'s ``op``, whose ``weight`` and ``bias`` are updated in place), so that the
        model without this module computes what it computed with it. Only for ``mergeable``.

        Called twice: first with ``inputs`` False for what the kind does at operations' outputs
        (every kind in turn, in the order they act), then with ``inputs`` True for what it does
        to their inputs (the kinds in reverse order: with M1 acting before M2 the layer
        computes W M2 M1 x): a transform of an input folds into the weight *after* every update
        that reads that input (LoRA's ``B A x``) has been added to it."""
        raise NotImplementedError(f"{type(self).__name__} does not merge")

    # -- a CLIP's text side (``text_side`` kinds) ------------------------------------------------
    def text_init_phrase(self) -> str | None:
        """The phrase whose token embeddings the learned text context starts from (None:
        keep its random start)."""
        return None

    def init_context(self, phrase: torch.Tensor) -> None:
        """Start the learned text context from a phrase's token embeddings (k, text width)."""

    def text_context(self) -> torch.Tensor | None:
        """The active choice's learned text context (n, text width), or None (the template)."""
        return None

    def peft_adapter(
        self, name_of: Callable[[int, str], str]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The active choice as a PEFT adapter of ``peft_type``: its config's fields (without
        the head and the base model) and its tensors, keyed as PEFT keys them without the
        base-model prefix (``name_of(layer, op)``: block ``layer``'s ``op``'s qualified name
        in the timm model)."""
        raise NotImplementedError(f"{type(self).__name__} has no PEFT counterpart")

    @classmethod
    def peft_combine(
        cls, parts: list[tuple[dict[str, Any], dict[str, torch.Tensor]]]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """One adapter from several kinds' ``peft_adapter`` parts of this ``peft_type`` (LoRA
        on several targets); ValueError, saying why, where PEFT cannot hold them together."""
        if len(parts) > 1:
            raise ValueError(f"a PEFT {cls.peft_type} adapter holds one of these kinds")
        return parts[0]


# ---------------------------------------------------------------------------------------------
# Layered kinds: depth + one dimension per layer
# ---------------------------------------------------------------------------------------------


class LayeredModule(PromptModule):
    """Shared runtime of kinds whose choice is one dimension per layer.

    Subclasses define ``layer_params(dim, geometry)``, ``make_layer(dim)`` returning a module
    that holds one layer's weights at ``dim``, and ``slice_axes``: for each parameter name of
    that layer module, the axis sliced to a smaller dim (None: not sliced)."""

    slice_axes: ClassVar[Mapping[str, int | None]] = {}

    def __init__(
        self,
        geometry: TowerGeometry,
        capacity: Sequence[int],
        options: Options | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        capacity = trim(capacity)
        if len(capacity) > geometry.depth:
            raise ValueError(
                f"{self.kind}: capacity has {len(capacity)} layers, tower has {geometry.depth}"
            )
        self.geometry = geometry
        self.capacity = capacity
        self.options = self.Options.of(options)
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
    def width_of(cls, dim: int) -> int:
        """The width a layer's dim sets (prompt tokens, a rank, a bottleneck), which a space
        keeps within 4 x the backbone's width; 0 where it sets none (a set of operations)."""
        return dim

    @classmethod
    def dim_str(cls, dim: int) -> str:
        """One layer's dim as a subnet prints it."""
        return str(dim)

    @classmethod
    def choice_str(cls, choice: Sequence[int]) -> str:
        choice = trim(choice)
        if not choice:
            return "-"
        if len(set(choice)) == 1:
            one = cls.dim_str(choice[0])
            return f"{one if one.isalnum() else f'({one})'}x{len(choice)}"
        return "[" + ",".join(map(cls.dim_str, choice)) + "]"

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
        if depths == (0,):
            reader.fail(
                join_key(key, "depths"), "only 0 (absent): give at least one positive depth"
            )
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
        options = cls.Options.parse(value.get("options", {}), reader, join_key(key, "options"))
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
                f"{self.kind}: choice {self.choice_str(choice)} exceeds the allocated capacity "
                f"{self.choice_str(self.capacity)}"
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
                f"{self.kind}: cannot export {self.choice_str(choice)} from "
                f"{self.choice_str(self.capacity)}"
            )
        clone = type(self)(self.geometry, choice, self.options)
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
