"""Prompt inversion: from token space back to pixels through a ViT's linear patch embedding.

A timm ViT embeds each patch ``x`` (C x p x p, normalised) as ``W vec(x) + b``. Where
``W`` (width x C·p²) has full row rank — C·p² >= width, as for ViT-B/16 (768 -> 768) — every
token is the embedding of some patch, and the minimum-norm patch ``W⁺ (t - b)`` reproduces the
token exactly. Where it has not (the committed 1-channel ``vit_fmnist``: 49 pixels per patch
for 192 dimensions), the same formula gives the least-squares patch, whose embedding is the
projection of the token onto the patches' span; what is lost is measured by
``reconstruction_error``. Deployed prompt patches are then pixels: denormalised, clipped to
[0, 1] and, by default, quantised to 8 bits (``to_pixels``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nas.errors import NasError


class PatchInverse:
    """The patch embedding of ``backbone`` (a timm ViT) and its pseudo-inverse."""

    def __init__(self, backbone: nn.Module) -> None:
        embed = backbone.patch_embed
        if not isinstance(getattr(embed, "norm", nn.Identity()), nn.Identity):
            raise NasError("prompt inversion needs a linear patch embedding (no patch norm)")
        conv = embed.proj
        self.channels, (self.patch, _) = conv.in_channels, conv.kernel_size
        weight = conv.weight.detach().double().reshape(conv.out_channels, -1)  # (D, C·p·p)
        self.weight = weight
        self.bias = (
            conv.bias.detach().double()
            if conv.bias is not None
            else torch.zeros(conv.out_channels, dtype=torch.float64)
        )
        self.pinv = torch.linalg.pinv(weight)  # (C·p·p, D)
        self.rank = int(torch.linalg.matrix_rank(weight))

    @property
    def exact(self) -> bool:
        """Whether every token is reachable by some patch (full row rank)."""
        return self.rank == self.weight.shape[0]

    def patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised patches (..., C, p, p) whose embeddings are ``tokens`` (..., D), exactly
        when ``exact``, in the least-squares sense otherwise."""
        flat = (tokens.double() - self.bias) @ self.pinv.T
        return flat.reshape(*tokens.shape[:-1], self.channels, self.patch, self.patch)

    def tokens(self, patches: torch.Tensor) -> torch.Tensor:
        """The embedding of normalised patches (..., C, p, p): (..., D)."""
        return patches.double().flatten(-3) @ self.weight.T + self.bias

    def reconstruction_error(self, tokens: torch.Tensor) -> float:
        """Relative error of the tokens reached through ``patches``: 0 when ``exact``."""
        back = self.tokens(self.patches(tokens))
        centred = tokens.double() - self.bias
        return float((back - tokens.double()).norm() / centred.norm().clamp_min(1e-12))


def to_pixels(
    patches: torch.Tensor, mean: Sequence[float], std: Sequence[float], bits: int | None = 8
) -> torch.Tensor:
    """Normalised patches (..., C, p, p) as an image's pixels: denormalised, clipped to [0, 1],
    quantised to ``bits`` (None: not quantised), then normalised again for the model."""
    shape = (len(mean), 1, 1)
    m = torch.tensor(mean, dtype=patches.dtype).reshape(shape)
    s = torch.tensor(std, dtype=patches.dtype).reshape(shape)
    pixels = (patches * s + m).clamp(0.0, 1.0)
    if bits is not None:
        levels = 2**bits - 1
        pixels = torch.round(pixels * levels) / levels
    return (pixels - m) / s
