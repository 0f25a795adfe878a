"""The registry of prompt module kinds. A new kind is one file plus one line here."""

from __future__ import annotations

from nas.errors import NasError
from nas.modules.adapter import Adapter
from nas.modules.base import LayeredModule, PromptModule
from nas.modules.lora import LoRA
from nas.modules.pgn import PGN, PGNSpace
from nas.modules.spaces import LayeredSpace, ModuleSpace
from nas.modules.upt import UPT, UPTSpace
from nas.modules.vpt import VPT

REGISTRY: dict[str, type[PromptModule]] = {cls.kind: cls for cls in (VPT, LoRA, Adapter, PGN, UPT)}


def module_class(kind: str) -> type[PromptModule]:
    """The class of a registered kind; NasError naming the known kinds otherwise."""
    try:
        return REGISTRY[kind]
    except KeyError:
        raise NasError(f"unknown prompt module {kind!r}; known: {', '.join(REGISTRY)}") from None


__all__ = [
    "PGN",
    "REGISTRY",
    "UPT",
    "VPT",
    "Adapter",
    "LayeredModule",
    "LayeredSpace",
    "LoRA",
    "ModuleSpace",
    "PGNSpace",
    "PromptModule",
    "UPTSpace",
    "module_class",
]
