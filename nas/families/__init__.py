"""Backbone families (``vit/``, ``clip/``; each a spec and a prompted model over
``prompted.PromptedModel``), the one builder that picks the family (``build_prompted``) and the
one loader of saved model folders (``load``). The families' registry is
``nas.space.backbones`` (a space's ``backbone:`` is read through it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas.core.errors import NasError
from nas.core.paths import SUBNET_FILE
from nas.core.validate import Reader
from nas.core.yamlio import load_yaml
from nas.space.backbones import FAMILIES, Backbone, family_of

if TYPE_CHECKING:
    from nas.families.prompted import PromptedModel
    from nas.space.search_space import SearchSpace
    from nas.space.subnet import Subnet


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
