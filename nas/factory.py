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

#: A backbone family's spec: a timm ViT classifier or a CLIP.
Backbone = BackboneSpec | ClipSpec


def supernet(space: SearchSpace, backbone: Backbone, split: Any, dataset: str = "") -> PromptedViT:
    """The weight-entangled supernet of ``space`` for the split's classes."""
    return backbone.supernet(space, split, dataset)


def subnet_model(
    space: SearchSpace,
    backbone: Backbone,
    subnet: Subnet,
    split: Any,
    *,
    full_finetune: bool = False,
    dataset: str = "",
) -> PromptedViT:
    """The standalone model of ``subnet`` for the split's classes, from the pretrained weights."""
    return backbone.subnet_model(space, subnet, split, full_finetune=full_finetune, dataset=dataset)


def head_params(backbone: Backbone, num_classes: int) -> int:
    """Parameters of the classification head that trains with every method (none in CLIP)."""
    return backbone.head_params(num_classes)


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
