"""PGN's prompt generators: small timm ResNets by name, their exact parameter and FLOPs counts.

The names are plain data; torch and timm are imported by the functions that build a generator
or count one (on the meta device), so that reading a PGN choice or space needs neither.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from timm.models.resnet import ResNet

#: generator variants: timm ResNets of BasicBlocks (the paper's 4-stage ResNet-10 by default)
GENERATORS: dict[str, dict[str, Any]] = {
    "resnet10": {"layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128), "stem_width": 16},
    "resnet18": {"layers": (2, 2, 2, 2), "channels": (64, 128, 256, 512), "stem_width": 64},
}


def make_generator(name: str, in_chans: int, device: str | torch.device | None = None) -> ResNet:
    """A generator variant: a timm ResNet with no classifier (it returns pooled features)."""
    from timm.models.resnet import BasicBlock, ResNet  # heavy: see the module's docstring

    cfg = GENERATORS[name]
    return ResNet(
        BasicBlock,
        cfg["layers"],
        num_classes=0,
        in_chans=in_chans,
        channels=cfg["channels"],
        stem_width=cfg["stem_width"],
        device=device,
    )


@functools.cache
def generator_params(name: str, in_chans: int) -> tuple[int, int]:
    """(parameters, feature width) of a generator variant, counted on the meta device."""
    model = make_generator(name, in_chans, device="meta")
    return sum(p.numel() for p in model.parameters()), int(model.num_features)


@functools.cache
def generator_flops(name: str, in_chans: int, resolution: int) -> int:
    """Matmul/conv FLOPs of one image through a generator, counted on the meta device."""
    import torch  # heavy: see the module's docstring
    from torch.utils.flop_counter import FlopCounterMode

    model = make_generator(name, in_chans, device="meta").eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(1, in_chans, resolution, resolution, device="meta"))
    return int(counter.get_total_flops())
