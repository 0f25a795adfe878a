"""The backbone families' registry: how a search space's ``backbone:`` value, the builder and
the loader reach a family (timm's ViT classifiers, the default; CLIP; or one a user registers).

A family is a spec class (what ``backbone:`` names: its geometry, weights, normalisation; it
describes and never builds a model) and a prompted-model class (a
``nas.families.prompted.PromptedModel`` subclass with a ``FORMAT`` and a ``build``
classmethod). The shipped families' code is named here as ``"module:attr"`` strings, imported
on first use, so this registry imports no family (``nas.families`` holds the builder).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from nas.core.errors import NasError
from nas.core.registry import Registry, resolve

if TYPE_CHECKING:
    from nas.towers.geometry import TowerGeometry


class Backbone(Protocol):
    """What the platform asks of a backbone family's spec (a timm ViT classifier:
    ``nas.families.vit.spec.BackboneSpec``; a CLIP: ``nas.families.clip.spec.ClipSpec``);
    nothing outside a family's own files asks which family it is."""

    #: The family's key in ``FAMILIES``.
    family: ClassVar[str]
    #: Whether it classifies by class names (a CLIP's text tower) rather than a trained head.
    classifies_by_name: ClassVar[bool]

    def geometry(self) -> TowerGeometry: ...
    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]: ...
    def head_params(self, num_classes: int) -> int: ...
    def weight_files(self) -> dict[str, str | None]: ...
    def check_weights(self) -> None: ...
    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Family:
    """One backbone family. Each reference is an object or a ``"module:attr"`` string.

    Args:
        key: how a space names it explicitly (``backbone: {KEY: NAME_OR_PATH}``).
        load: reads the family's spec from a name or path (a ConfigError when it cannot).
        model: its ``PromptedModel`` subclass (``build``, ``FORMAT``, ``load``).
        claims: whether a bare name or path is this family's (``backbone: NAME``); the default
            family (None) takes what no other family claims.
        mapping: reads an inline mapping (``backbone: {model: ..., weights: ...}``) as called
            with ``(data, reader, key, base)``; only the default family has one.
    """

    key: str
    load: str | Callable[[str | Path], Backbone]
    model: str | type
    claims: str | Callable[[str | Path], bool] | None = None
    mapping: str | Callable[..., Backbone] | None = None

    def load_spec(self, name_or_path: str | Path) -> Backbone:
        return resolve(self.load)(name_or_path)

    def claims_value(self, name_or_path: str | Path) -> bool:
        return self.claims is not None and bool(resolve(self.claims)(name_or_path))

    def model_class(self) -> type:
        """The family's ``nas.families.prompted.PromptedModel`` subclass (not imported here:
        the families sit above this registry)."""
        return resolve(self.model)


#: The backbone families by key; the first is the default.
FAMILIES: Registry[Family] = Registry(
    "backbone family",
    {
        "vit": Family(
            "vit",
            load="nas.families.vit.spec:load_backbone",
            model="nas.families.vit.model:PromptedViT",
            mapping="nas.families.vit.spec:parse_backbone_mapping",
        ),
        "clip": Family(
            "clip",
            load="nas.families.clip.spec:load_clip",
            model="nas.families.clip.model:PromptedCLIP",
            claims="nas.families.clip.names:is_clip",
        ),
    },
)
DEFAULT_FAMILY = "vit"


def register_family(family: Family) -> Family:
    """A new backbone family (``backbone: {KEY: ...}`` in a space reaches it)."""
    return FAMILIES.register(family.key, family)


def family_of(backbone: Backbone) -> Family:
    """The registered family of a spec (by its ``family`` key)."""
    key = getattr(backbone, "family", None)
    if key not in FAMILIES:
        raise NasError(
            f"{type(backbone).__name__}: its family {key!r} is not registered "
            f"(registered: {', '.join(FAMILIES)})"
        )
    return FAMILIES[key]
