"""A frozen timm ViT carrying prompt modules: the supernet and the standalone subnet model.

``PromptedViT`` (a ``nas.families.prompted.PromptedModel``, as CLIP's ``PromptedCLIP`` is) is one
class for both. As a supernet it holds every module at the search
space's maxima and ``set_subnet`` switches the active slices (bookkeeping only: nothing is
allocated or copied). ``export`` gives the standalone model of one subnet: a copy of the
backbone and modules allocated at exactly that subnet's sizes, with the same logits.

Saving writes, like PEFT's ``save_pretrained``, only what was trained: ``weights.safetensors``
(module and head weights) beside ``subnet.yaml`` (the subnet, module options, backbone
architecture, class count and a hash of the frozen backbone it was trained on).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nas.core.errors import NasError
from nas.core.paths import BACKBONES_DIR, SUBNET_FILE, WEIGHTS_FILE
from nas.core.validate import Reader
from nas.families.prompted import PromptedModel, weights_hash
from nas.families.vit.spec import BackboneSpec
from nas.modules import module_class
from nas.modules.base import PromptModule
from nas.modules.options import Options
from nas.space.cost import head_params, subnet_params
from nas.space.search_space import SearchSpace
from nas.space.subnet import Subnet
from nas.towers.adapters import geometry_of

__all__ = ["PromptedViT", "backbone_hash"]


def backbone_hash(model: nn.Module) -> str:
    """SHA-256 over the frozen backbone weights (head excluded), for provenance checks."""
    return weights_hash(model, skip=("head.", "head_dist."))


def _recorded_backbone(reader: Reader, value: Any) -> BackboneSpec:
    """The backbone a saved subnet records (``backbone`` in subnet.yaml), each field checked."""
    bb = reader.mapping(
        value,
        "backbone",
        required=["model"],
        optional=["overrides", "weights", "mean", "std", "name"],
    )
    for key in ("mean", "std"):
        v = bb.get(key)
        if v is not None and not (
            isinstance(v, list)
            and v
            and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
        ):
            reader.fail(f"backbone.{key}", f"expected a list of numbers, got {v!r}")
    overrides = reader.mapping(bb.get("overrides") or {}, "backbone.overrides", open_keys=True)
    return BackboneSpec(
        reader.string(bb["model"], "backbone.model"),
        dict(overrides),
        weights=_recorded_weights(bb.get("weights"), bb.get("name")),
        mean=tuple(bb["mean"]) if bb.get("mean") else None,
        std=tuple(bb["std"]) if bb.get("std") else None,
        name=bb.get("name"),
    )


def _build_recorded(meta_path: Path, spec: BackboneSpec | None, num_classes: int) -> nn.Module:
    """The recorded backbone, built with its weights; one NasError naming subnet.yaml if not."""
    if spec is None:
        raise NasError(f"{meta_path}: no backbone recorded; pass the backbone to load onto")
    if spec.weights not in (None, "hub") and not Path(spec.weights).is_file():
        raise NasError(
            f"{meta_path}: the backbone weights it records ({spec.weights}) are not "
            "here; pass the pretrained backbone to load onto: "
            "PromptedViT.load(folder, backbone)"
        )
    try:
        return spec.create(num_classes)
    except NasError:
        raise
    except Exception as exc:  # an edited architecture timm cannot build
        raise NasError(
            f"{meta_path}: its backbone ({spec.model}, overrides {spec.overrides}) "
            f"cannot be built: {type(exc).__name__}: {str(exc)[:200]}"
        ) from None


def _recorded_weights(weights: str | None, name: str | None) -> str | None:
    """The weights file a saved model records. One of the project's shipped backbones is
    found where this checkout keeps it, wherever the checkout that saved it was (the sha256
    check still proves they are the same weights)."""
    if not isinstance(weights, str) or not isinstance(name, str):
        return weights
    if not weights or weights == "hub" or Path(weights).is_file() or not name:
        return weights
    shipped = BACKBONES_DIR / name / Path(weights).name
    return str(shipped) if shipped.is_file() else weights


class PromptedViT(PromptedModel):
    """A frozen timm VisionTransformer plus prompt modules, switchable between subnets.

    Args:
        backbone: a timm VisionTransformer with its classification head already sized
            (``BackboneSpec.create(num_classes)``). It is owned from now on: its weights are
            frozen (the head stays trainable) and forward hooks are attached to its blocks.
        modules: prompt modules by kind, each built for this backbone's geometry.
        backbone_spec: the architecture it was built from, recorded when saving.
        full_finetune: every backbone weight trains too (the full fine-tuning baseline).
    """

    FORMAT = "nas-prompt-subnet/1"

    def __init__(
        self,
        backbone: nn.Module,
        modules: Mapping[str, PromptModule],
        backbone_spec: BackboneSpec | None = None,
        full_finetune: bool = False,
    ) -> None:
        super().__init__(backbone, modules, geometry_of(backbone))
        self.backbone_spec = backbone_spec
        self.full_finetune = full_finetune
        self.backbone.requires_grad_(full_finetune)
        for head in self.tower.head_modules():
            head.requires_grad_(True)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        backbone: BackboneSpec,
        space: SearchSpace,
        split: Any,
        *,
        subnet: Subnet | None = None,
        full_finetune: bool = False,
        dataset: str = "",
    ) -> PromptedViT:
        """The supernet of ``space`` or the standalone model of ``subnet`` (with
        ``full_finetune``, every backbone weight trains too), with a fresh head for the
        split's classes on the pretrained weights."""
        trunk = backbone.create(split.num_classes)
        if subnet is None:
            return cls.supernet(space, split.num_classes, trunk)
        return cls.for_subnet(trunk, subnet, space.options(), backbone, full_finetune=full_finetune)

    @classmethod
    def supernet(
        cls, space: SearchSpace, num_classes: int, backbone: nn.Module | None = None
    ) -> PromptedViT:
        """The weight-entangled supernet of ``space`` (random backbone unless one is given)."""
        backbone = backbone if backbone is not None else space.backbone.create(num_classes)
        g = geometry_of(backbone)
        if g != space.geometry:
            raise NasError(
                f"the backbone's geometry {g} does not match the one search space "
                f"{space.name!r} assumes ({space.geometry})"
            )
        modules = {
            kind: module_class(kind)(g, s.capacity(), s.options)
            for kind, s in space.modules.items()
        }
        model = cls(backbone, modules, space.backbone)
        model.set_subnet(space.largest())
        return model

    @classmethod
    def for_subnet(
        cls,
        backbone: nn.Module,
        subnet: Subnet,
        options: Mapping[str, Options | Mapping[str, Any]] | None = None,
        backbone_spec: BackboneSpec | None = None,
        *,
        full_finetune: bool = False,
    ) -> PromptedViT:
        """A standalone model with modules allocated at exactly ``subnet``'s sizes; with
        ``full_finetune`` every backbone weight trains too (the full fine-tuning baseline)."""
        g = geometry_of(backbone)
        options = options or {}
        modules = {
            kind: module_class(kind)(g, choice, options.get(kind, {}))
            for kind, choice in subnet.items()
        }
        model = cls(backbone, modules, backbone_spec, full_finetune)
        model.set_subnet(subnet)
        return model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tower.forward(images)

    def num_params(self, num_classes: int | None = None) -> dict[str, int]:
        """Trainable parameters of the active subnet: modules (with full fine-tuning, every
        backbone weight but the head), head, and their total."""
        modules = subnet_params(self.subnet, self.geometry)
        head = sum(p.numel() for h in self.tower.head_modules() for p in h.parameters())
        if self.full_finetune:
            modules += sum(p.numel() for p in self.backbone.parameters()) - head
        if num_classes is not None:
            head = head_params(self.geometry, num_classes)
        return {"modules": modules, "head": head, "total": modules + head}

    # -- standalone export (PromptedModel.export, on a copy of the backbone and its head) ----
    def _frozen(self) -> nn.Module:
        return self.backbone

    def _rebuild(self, frozen: nn.Module, modules: dict[str, PromptModule]) -> PromptedViT:
        return type(self)(frozen, modules, self.backbone_spec, self.full_finetune)

    # -- save / load -------------------------------------------------------------------------
    def _record(self) -> dict[str, Any]:
        return {
            "num_classes": int(self.backbone.num_classes),
            "backbone": self.backbone_spec.to_dict() if self.backbone_spec else None,
            # Fully fine-tuned weights are all saved: no pretrained backbone to check against.
            "backbone_sha256": None if self.full_finetune else backbone_hash(self.backbone),
            "full_finetune": self.full_finetune,
        }

    @classmethod
    def load(
        cls,
        directory: str | Path,
        backbone: nn.Module | None = None,
        *,
        merge: bool = False,
        check_backbone: bool = True,
    ) -> PromptedViT:
        """Load a saved subnet onto ``backbone`` (built from the recorded architecture when not
        given; pass the pretrained backbone it was trained on). A backbone whose weights differ
        from the recorded hash is refused unless ``check_backbone`` is False. With ``merge``,
        the mergeable kinds are folded into the backbone's weights (``PromptedModel.merge``)."""
        meta_path = Path(directory) / SUBNET_FILE
        reader, meta, subnet = cls._open_saved(directory, ["num_classes"])
        num_classes = reader.integer(meta["num_classes"], "num_classes", minimum=1)
        spec = _recorded_backbone(reader, meta["backbone"]) if meta.get("backbone") else None
        if backbone is None:
            backbone = _build_recorded(meta_path, spec, num_classes)
        if int(getattr(backbone, "num_classes", num_classes)) != num_classes:
            raise NasError(
                f"{meta_path}: saved for {num_classes} classes, the backbone's head has "
                f"{backbone.num_classes}"
            )
        recorded = meta.get("backbone_sha256")
        if check_backbone and recorded and backbone_hash(backbone) != recorded:
            raise NasError(
                f"{meta_path}: the backbone's frozen weights differ from the ones these prompt "
                "weights were trained on (sha256 mismatch); load onto the same pretrained backbone"
            )
        options = reader.mapping(meta.get("options") or {}, "options", open_keys=True)
        try:
            model = cls.for_subnet(
                backbone,
                subnet,
                options,
                spec,
                full_finetune=bool(meta.get("full_finetune", False)),
            )
        except NasError:
            raise
        except Exception as exc:  # a subnet or options edited beyond what the backbone takes
            raise NasError(
                f"{meta_path}: subnet {subnet} cannot be built on this backbone: "
                f"{type(exc).__name__}: {str(exc)[:200]}"
            ) from None
        model._load_weights(Path(directory) / WEIGHTS_FILE)
        if merge:
            model.merge()
        return model
