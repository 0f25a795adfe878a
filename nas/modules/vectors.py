"""The vector kinds' shared module (what they are as data: ``nas.modules.vectors_kind``): per
layer, the vectors of each target of the allocated sets, applied where the active set has them
and folded into the frozen weights on merging."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from nas.core.errors import NasError
from nas.modules.base import LayeredModule
from nas.modules.spaces import trim
from nas.modules.vectors_kind import VectorKind, width
from nas.towers.geometry import Weights


class VectorModule(VectorKind, LayeredModule):
    """Shared runtime of the vector kinds. Subclasses set ``vectors`` (each of their kind's
    ``vector_names`` with its initialisation, in place), and define ``apply`` (what the vectors
    do to a site's tensor) and ``fold`` (the same folded into the operation's frozen weights)."""

    vectors: ClassVar[Mapping[str, Callable[[torch.Tensor], Any]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.vectors and not cls.vector_names:  # a kind in one class: its vectors name them
            cls.vector_names = tuple(cls.vectors)
        if cls.vectors and tuple(cls.vectors) != cls.vector_names:
            raise TypeError(
                f"{cls.__name__}.vectors names {tuple(cls.vectors)}; its kind counts "
                f"{cls.vector_names}"
            )

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
