"""The registry of prompt module kinds. A new kind is one file plus one registration
(``REGISTRY.register(kind, cls)``, or a ``"module:attr"`` line below for a shipped kind); the
registry imports a kind's file when the kind is first asked for."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nas.core.errors import NasError
from nas.core.registry import Registry

if TYPE_CHECKING:  # the kinds' base imports torch; the registry names kinds without it
    from nas.modules.base import PromptModule

#: The kinds in their canonical order (subnets and reports list them so).
REGISTRY: Registry[type[PromptModule]] = Registry(
    "prompt module kind",
    {
        "vpt": "nas.modules.vpt:VPT",
        "lora": "nas.modules.lora:LoRA",
        "adapter": "nas.modules.adapter:Adapter",
        "pgn": "nas.modules.pgn:PGN",
        "upt": "nas.modules.upt:UPT",
        "ssf": "nas.modules.ssf:SSF",
        "bitfit": "nas.modules.bitfit:BitFit",
        "ia3": "nas.modules.ia3:IA3",
        "lora_proj": "nas.modules.lora:LoRAProj",
        "lora_fc1": "nas.modules.lora:LoRAFc1",
        "lora_fc2": "nas.modules.lora:LoRAFc2",
    },
)


def module_class(kind: str) -> type[PromptModule]:
    """The class of a registered kind; NasError naming the known kinds otherwise."""
    try:
        return REGISTRY[kind]
    except KeyError:
        raise NasError(f"unknown prompt module {kind!r}; known: {', '.join(REGISTRY)}") from None
