"""What a prompt module kind *is*, as data: its choices (parsing, canonical form, printing),
its exact costs (trainable parameters, added tokens, FLOPs) and its search space, without
weights. Torch-free, so that describing a space (``nas space show``, ``nas space validate``,
``nas subnet show``) loads neither torch nor timm.

``Kind`` is the base of every kind; ``LayeredKind`` that of the kinds whose choice is one
dimension per layer (VPT, LoRA, Adapter, the vector kinds). A kind's module class
(``nas.modules.base.PromptModule``) subclasses its kind, so that the costs a space counts are
the ones the built module has. A shipped kind keeps this side in its own ``*_kind.py`` file;
a user's kind may keep both in one file (the registry then reads its module class).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from nas.core.validate import Reader
from nas.core.yamlio import join_key
from nas.modules.options import Options
from nas.modules.spaces import Choice, LayeredSpace, ModuleSpace, trim
from nas.towers.geometry import SITES, TowerGeometry


class Kind:
    """Base class of prompt module kinds, as data. Subclasses set ``kind`` and ``sites``, and
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


class LayeredKind(Kind):
    """A kind whose choice is one dimension per layer for layers ``0..depth-1`` (0 = absent on
    that layer). Subclasses define ``layer_params(dim, geometry)``."""

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
