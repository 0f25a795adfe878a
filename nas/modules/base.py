"""Prompt modules: a kind (``nas.modules.kind``: its choices and costs as data) with weights,
and the shared runtime of the layered kinds.

An instance holds weights at some *capacity* (the supernet's maxima, or exactly one subnet's
sizes for a standalone model), is switched to a choice with ``activate`` (bookkeeping only: no
allocation, no copy), and acts at the tower sites its kind names in ``sites``
(``nas.towers.geometry.SITES``: the token sequence, and the input or output of a block's qkv,
proj, fc1, fc2, LayerNorms and MLP). A kind owns its capabilities: where it acts, whether it
folds into the frozen weights (``mergeable``, ``merge_into``), its options and their defaults;
no code outside ``nas.modules`` names a kind.

The layered kinds (VPT, LoRA, Adapter, the vector kinds) share ``LayeredModule``, the runtime
of ``nas.modules.kind.LayeredKind`` (a choice is one dimension per layer): weights are
allocated once per layer at the capacity's dimension and a choice uses leading slices of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from nas.modules.kind import Kind, LayeredKind
from nas.modules.options import Options
from nas.modules.spaces import Choice, trim
from nas.towers.geometry import TokenLayout, TowerGeometry, Weights


class PromptModule(Kind, nn.Module):
    """Base class of prompt modules: a kind (``nas.modules.kind.Kind``: its choices and costs)
    with weights. Subclasses subclass their kind and define the runtime below."""

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


class LayeredModule(LayeredKind, PromptModule):
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
