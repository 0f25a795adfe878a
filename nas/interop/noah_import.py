"""Reading NOAH's released subnet configs (Zhang et al., 2022; ``experiments/NOAH/subnet/``
in NOAH's code) as subnets of this platform.

A NOAH subnet config is YAML: ``MODEL_NAME`` (ViT-B/16), a ``SUPERNET`` section naming the
supernet's depth and each module's maximum dim, a ``SEARCH_SPACE`` section, and a ``RETRAIN``
section holding the searched subnet as one list per module kind with one dim per block::

    RETRAIN:
      VISUAL_PROMPT_DIM: [10, 1, 5, 10, 5, 1, 10, 5, 5, 5, 10, 1]   # prompt tokens per block
      LORA_DIM: [...]                                               # LoRA rank per block
      ADAPTER_DIM: [...]                                            # adapter width per block
      PREFIX_DIM: [0, 0, ...]                                       # always 0 in NOAH's subnets

A dim of 0 means no module on that block; a module's depth is the blocks up to its last
non-zero dim. ``import_noah`` turns the ``RETRAIN`` section into a ``Subnet``; every problem
is one ``ConfigError`` naming the file, the key and its line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nas.core.errors import ConfigError
from nas.core.validate import Reader
from nas.core.yamlio import Document, join_key, load_yaml
from nas.modules import REGISTRY, kind_class
from nas.space.subnet import Subnet


def noah_kinds() -> dict[str, str]:
    """NOAH's RETRAIN keys and the module kinds they set (each kind's ``noah_key``)."""
    return {kind_class(k).noah_key: k for k in REGISTRY if kind_class(k).noah_key}


#: Prefix tuning is in NOAH's code but never in its released subnets; it is not offered here.
PREFIX_KEY = "PREFIX_DIM"
NOAH_DEPTH = 12  # ViT-B/16's blocks, NOAH's SUPERNET.DEPTH


@dataclass(frozen=True)
class NoahSubnet:
    """A NOAH config read: the subnet, the model it was searched on, and its file."""

    subnet: Subnet
    model: str | None
    source: str


def is_noah_config(data: Any) -> bool:
    """Whether parsed YAML looks like a NOAH config (it has NOAH's RETRAIN section)."""
    return isinstance(data, dict) and "RETRAIN" in data


def import_noah(path: str | Path) -> NoahSubnet:
    """The subnet of NOAH's config at ``path`` (its ``RETRAIN`` section)."""
    doc = load_yaml(path)
    return noah_subnet(doc)


def noah_subnet(doc: Document) -> NoahSubnet:
    r = Reader(doc)
    data = doc.data
    if not isinstance(data, dict):
        r.fail("", "expected NOAH's subnet config (a mapping with a RETRAIN section)")
    if "RETRAIN" not in data:
        r.fail(
            "",
            "missing required key 'RETRAIN': not one of NOAH's subnet configs (NOAH's "
            "experiments/NOAH/subnet/*/*.yaml hold the searched subnet in RETRAIN); for this "
            "platform's own subnet YAML use 'nas subnet show'",
        )
    model = None
    if "MODEL_NAME" in data:
        model = r.string(data["MODEL_NAME"], "MODEL_NAME")
        if "vit_base_patch16" not in model:
            r.fail(
                "MODEL_NAME",
                f"{model!r} is not a ViT-B/16: NOAH's subnets are for vit_base_patch16_224 "
                "(12 blocks, width 768), and a subnet's parameters depend on the backbone",
            )
        size = re.search(r"vit_base_patch16_(\d+)", model)
        if size and size.group(1) != "224":
            r.fail(
                "MODEL_NAME",
                f"{model!r} takes {size.group(1)}-pixel images: the spaces here check NOAH's "
                "subnets on vit_base_patch16_224, and a VPT's FLOPs depend on the token count",
            )
    kinds = noah_kinds()
    depth, maxima = _supernet(r, data.get("SUPERNET"), kinds)
    retrain = r.mapping(data["RETRAIN"], "RETRAIN", optional=[*kinds, PREFIX_KEY], open_keys=False)
    if not any(k in retrain for k in kinds):
        r.fail("RETRAIN", f"names no module; expected some of {', '.join(kinds)}")
    choices: dict[str, list[int]] = {}
    for key in [*kinds, PREFIX_KEY]:
        if key not in retrain:
            continue
        where = join_key("RETRAIN", key)
        value = retrain[key]
        if not isinstance(value, list):
            r.fail(where, f"expected a list of {depth} per-block dims, got {value!r}")
        if len(value) != depth:
            r.fail(where, f"has {len(value)} dims; expected one per block ({depth})")
        dims = [r.integer(v, join_key(where, i), minimum=0) for i, v in enumerate(value)]
        if key == PREFIX_KEY:
            if any(dims):
                r.fail(where, "prefix tuning is not offered here (NOAH's subnets never use it)")
            continue
        top = maxima.get(key)
        for i, dim in enumerate(dims):
            if kind_class(kinds[key]).width_of(dim) != dim:  # the kind reads more than a width
                r.fail(join_key(where, i), f"{dim:,} is not a width this kind takes")
            if top is not None and dim > top:
                r.fail(
                    join_key(where, i),
                    f"{dim} exceeds the supernet's maximum SUPERNET.{key} = {top}",
                )
        choices[kinds[key]] = dims
    if not any(any(dims) for dims in choices.values()):
        r.fail("RETRAIN", "every dim is 0: an empty subnet (no module on any block), which "
               "would train the head alone; NOAH's searched subnets hold modules")  # fmt: skip
    return NoahSubnet(Subnet(choices), model, doc.file or "<text>")


def _supernet(r: Reader, value: Any, kinds: dict[str, str]) -> tuple[int, dict[str, int]]:
    """SUPERNET's DEPTH (NOAH's 12 when absent) and each module's maximum dim."""
    if value is None:
        return NOAH_DEPTH, {}
    sup = r.mapping(value, "SUPERNET", open_keys=True)
    depth = r.integer(sup.get("DEPTH", NOAH_DEPTH), "SUPERNET.DEPTH", minimum=1)
    if depth != NOAH_DEPTH:
        r.fail("SUPERNET.DEPTH", f"{depth}; NOAH's ViT-B/16 subnets span {NOAH_DEPTH} blocks")
    maxima = {
        key: r.integer(sup[key], join_key("SUPERNET", key), minimum=0)
        for key in kinds
        if key in sup
    }
    return depth, maxima


def load_subnet_file(path: str | Path) -> Subnet:
    """A subnet from a file: this platform's subnet YAML, or one of NOAH's configs."""
    doc = load_yaml(path)
    if is_noah_config(doc.data):
        return noah_subnet(doc).subnet
    return Subnet.from_data(doc.data, doc)


__all__ = ["ConfigError", "NoahSubnet", "import_noah", "is_noah_config", "load_subnet_file"]
