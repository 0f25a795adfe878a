"""The registry of prompt module kinds. A new kind is one file plus one registration
(``REGISTRY.register(kind, cls)``, or a ``"module:attr"`` line below for a shipped kind); the
registry imports a kind's file when the kind is first asked for.

A shipped kind's choices and costs also sit apart from its weights, in a torch-free
``*_kind.py`` (``LIGHT``): what describing a space reads (``kind_class``), so that `nas space
show` loads no torch. A kind registered as one class answers both from that class."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from nas.core.errors import NasError
from nas.core.registry import Registry, resolve

if TYPE_CHECKING:  # the kinds' base imports torch; the registry names kinds without it
    from nas.modules.base import PromptModule
    from nas.modules.kind import Kind

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


#: The torch-free side of the shipped module classes above (each module class subclasses it).
LIGHT: dict[str, str] = {
    "nas.modules.vpt:VPT": "nas.modules.vpt_kind:VPTKind",
    "nas.modules.lora:LoRA": "nas.modules.lora_kind:LoRAKind",
    "nas.modules.adapter:Adapter": "nas.modules.adapter_kind:AdapterKind",
    "nas.modules.pgn:PGN": "nas.modules.pgn_kind:PGNKind",
    "nas.modules.upt:UPT": "nas.modules.upt_kind:UPTKind",
    "nas.modules.lora:LoRAProj": "nas.modules.lora_kind:LoRAProjKind",
    "nas.modules.lora:LoRAFc1": "nas.modules.lora_kind:LoRAFc1Kind",
    "nas.modules.lora:LoRAFc2": "nas.modules.lora_kind:LoRAFc2Kind",
    "nas.modules.ssf:SSF": "nas.modules.vectors_kind:SSFKind",
    "nas.modules.bitfit:BitFit": "nas.modules.vectors_kind:BitFitKind",
    "nas.modules.ia3:IA3": "nas.modules.vectors_kind:IA3Kind",
}


def kind_class(kind: str) -> type[Kind]:
    """A registered kind's choices and costs: its torch-free class where the registered module
    class is a shipped one with such a class (``LIGHT``), else the module class itself."""
    try:
        entry = REGISTRY.entry(kind)
    except KeyError:
        raise NasError(f"unknown prompt module {kind!r}; known: {', '.join(REGISTRY)}") from None
    if not isinstance(entry, str):  # resolved, or registered as a class: name it as LIGHT does
        entry = f"{entry.__module__}:{entry.__qualname__}"
    light = LIGHT.get(entry)
    return _resolved(light) if light is not None else module_class(kind)


@functools.cache
def _resolved(ref: str) -> type[Kind]:
    """A ``LIGHT`` reference imported once: costs ask for it in the search's inner loops."""
    return resolve(ref)


def module_class(kind: str) -> type[PromptModule]:
    """The class of a registered kind; NasError naming the known kinds otherwise."""
    try:
        return REGISTRY[kind]
    except KeyError:
        raise NasError(f"unknown prompt module {kind!r}; known: {', '.join(REGISTRY)}") from None
