"""Normalisation and augmentation as batched tensor ops, on whatever device the batch is on."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 normalised with per-channel mean/std (in [0, 1] units)."""
    x = images.float().div_(255.0)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def random_crop_flip(
    images: torch.Tensor,
    pad: int = 0,
    hflip: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-image random crop of a zero-padded copy (the size is kept) and horizontal flip."""
    b, _, h, w = images.shape
    out = images
    if pad > 0:
        padded = F.pad(images, (pad, pad, pad, pad))
        dev = images.device
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device="cpu").to(dev)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device="cpu").to(dev)
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        batch = torch.arange(b, device=dev)[:, None, None, None]
        chans = torch.arange(images.shape[1], device=dev)[None, :, None, None]
        out = padded[batch, chans, rows, cols]
    if hflip:
        flip = torch.rand(b, generator=generator, device="cpu").lt(0.5).to(images.device)
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out
