"""Backbone families: timm's ViT classifiers (the default), CLIP, or one a user registers.

A family is a spec class (what a search space's ``backbone:`` names: its geometry, weights,
normalisation; it describes and never builds a model) and a prompted-model class (a
``nas.prompted.PromptedModel`` subclass with a ``FORMAT`` and a ``build`` classmethod). This
registry names the shipped families' code as ``"module:attr"`` strings, imported on first use,
so it imports no family; ``build_prompted`` is the one builder that picks the family, ``load``
the one loader of saved model folders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from nas.errors import NasError
from nas.registry import Registry, resolve
from nas.validate import Reader
from nas.yamlio import load_yaml

if TYPE_CHECKING:
    from nas.prompted import PromptedModel
    from nas.space import SearchSpace
    from nas.subnet import Subnet
    from nas.towers.geometry import TowerGeometry


class Backbone(Protocol):
    """What the platform asks of a backbone family's spec (a timm ViT classifier:
    ``nas.backbone.BackboneSpec``; a CLIP: ``nas.clip.model.ClipSpec``); nothing outside a
    family's own files asks which family it is."""

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

    def model_class(self) -> type[PromptedModel]:
        return resolve(self.model)


#: A saved model folder's files: its description (``format``, subnet, backbone) and weights.
SUBNET_FILE = "subnet.yaml"
WEIGHTS_FILE = "weights.safetensors"

#: The backbone families by key; the first is the default.
FAMILIES: Registry[Family] = Registry(
    "backbone family",
    {
        "vit": Family(
            "vit",
            load="nas.backbone:load_backbone",
            model="nas.model:PromptedViT",
            mapping="nas.backbone:parse_backbone_mapping",
        ),
        "clip": Family(
            "clip",
            load="nas.clip.model:load_clip",
            model="nas.clip.prompted:PromptedCLIP",
            claims="nas.clip.model:is_clip",
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


def build_prompted(
    backbone: Backbone,
    space: SearchSpace,
    split: Any,
    *,
    subnet: Subnet | None = None,
    full_finetune: bool = False,
    dataset: str = "",
) -> PromptedModel:
    """The one model builder: the weight-entangled supernet of ``space`` (``subnet`` None), or
    the standalone model of ``subnet`` from the pretrained weights, for the classes of
    ``split`` (its ``num_classes``; a CLIP reads their names, ``dataset`` naming the task),
    built by the backbone's family."""
    model = family_of(backbone).model_class()
    return model.build(
        backbone, space, split, subnet=subnet, full_finetune=full_finetune, dataset=dataset
    )


def load(directory: str | Path) -> PromptedModel:
    """A saved subnet folder (``model.save``; a retrained winner's ``model`` artifact in
    MLflow), whichever family it was trained on: its ``subnet.yaml`` names the format, and the
    folder is loaded onto the frozen model it records (that family's ``load``)."""
    meta = Path(directory) / SUBNET_FILE
    if not meta.is_file():
        raise NasError(f"{meta}: missing; a saved subnet folder holds {SUBNET_FILE}")
    doc = load_yaml(meta)
    fmt = doc.data.get("format") if isinstance(doc.data, dict) else None
    formats = {f.model_class().FORMAT: f for f in FAMILIES.values()}
    if fmt not in formats:
        Reader(doc).fail("format", f"{fmt!r} is none of {sorted(formats)}")
    return formats[fmt].model_class().load(directory)
