"""The prompted model of a backbone, whichever kind it is: a timm ViT classifier
(``PromptedViT``, a head sized to the classes) or a CLIP (``PromptedCLIP``, the class names
through its text tower). The pipeline and the benchmarks build models only through here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nas.backbone import BackboneSpec
from nas.clip.model import ClipSpec
from nas.errors import NasError
from nas.model import PromptedViT
from nas.space import SearchSpace
from nas.subnet import Subnet


def class_names(backbone: BackboneSpec | ClipSpec, split: Any, dataset: str = "") -> list[str]:
    """The split's class names; a CLIP cannot classify without them."""
    names = getattr(split, "class_names", None)
    if not names:
        where = f"dataset {dataset!r}" if dataset else "this dataset"
        raise NasError(
            f"{where} has no class names, and the CLIP backbone classifies by name: add a "
            "classnames.txt (one name per line, in label order) to the dataset folder"
        )
    if len(names) != split.num_classes:
        raise NasError(f"{dataset}: {len(names)} class names for {split.num_classes} classes")
    return list(names)


def supernet(
    space: SearchSpace, backbone: BackboneSpec | ClipSpec, split: Any, dataset: str = ""
) -> PromptedViT:
    """The weight-entangled supernet of ``space`` for the split's classes."""
    if isinstance(backbone, ClipSpec):
        from nas.clip.prompted import PromptedCLIP

        return PromptedCLIP.supernet(
            space, class_names(backbone, split, dataset), backbone.create()
        )
    return PromptedViT.supernet(space, split.num_classes, backbone.create(split.num_classes))


def subnet_model(
    space: SearchSpace,
    backbone: BackboneSpec | ClipSpec,
    subnet: Subnet,
    split: Any,
    *,
    full_finetune: bool = False,
    dataset: str = "",
) -> PromptedViT:
    """The standalone model of ``subnet`` for the split's classes, from the pretrained weights."""
    if isinstance(backbone, ClipSpec):
        from nas.clip.prompted import PromptedCLIP

        if full_finetune:
            raise NasError("full fine-tuning is not offered for CLIP backbones")
        return PromptedCLIP.for_clip_subnet(
            backbone, class_names(backbone, split, dataset), subnet, space.options()
        )
    return PromptedViT.for_subnet(
        backbone.create(split.num_classes),
        subnet,
        space.options(),
        backbone,
        full_finetune=full_finetune,
    )


def head_params(backbone: BackboneSpec | ClipSpec, num_classes: int) -> int:
    """Parameters of the classification head that trains with every method (none in CLIP)."""
    if isinstance(backbone, ClipSpec):
        return 0
    g = backbone.geometry()
    return g.width * num_classes + num_classes


def load(directory: str | Path) -> PromptedViT:
    """A saved subnet folder (``model.save``; a retrained winner's ``model`` artifact in
    MLflow), whichever backbone it was trained on: it names its backbone and is loaded onto it
    (a CLIP and its class names, or a timm ViT built from the recorded architecture)."""
    from nas.clip.prompted import FORMAT as CLIP_FORMAT
    from nas.clip.prompted import PromptedCLIP
    from nas.model import SUBNET_FILE
    from nas.yamlio import load_yaml

    meta = Path(directory) / SUBNET_FILE
    if not meta.is_file():
        raise NasError(f"{meta}: missing; a saved subnet folder holds {SUBNET_FILE}")
    data = load_yaml(meta).data
    if isinstance(data, dict) and data.get("format") == CLIP_FORMAT:
        return PromptedCLIP.load_clip_subnet(directory)
    return PromptedViT.load(directory)
