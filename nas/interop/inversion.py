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

from nas.core.errors import NasError
from nas.modules.pgn_kind import border_patches


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
    patches: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    bits: int | None = 8,
    *,
    clip: bool = True,
) -> torch.Tensor:
    """Normalised patches (..., C, p, p) as an image's pixels: denormalised, clipped to [0, 1]
    (unless ``clip`` is False), quantised to ``bits`` (None: not quantised), then normalised
    again for the model."""
    shape = (len(mean), 1, 1)
    m = torch.tensor(mean, dtype=patches.dtype, device=patches.device).reshape(shape)
    s = torch.tensor(std, dtype=patches.dtype, device=patches.device).reshape(shape)
    pixels = patches * s + m
    if clip:
        pixels = pixels.clamp(0.0, 1.0)
    if bits is not None:
        levels = 2**bits - 1
        pixels = torch.round(pixels * levels) / levels
    return (pixels - m) / s


class RGBPrompts(nn.Module):
    """A trained PGN with ``border`` placement as what a hosted, unmodified ViT can be given:
    the generator reads the image and the prompts come out as pixel patches pasted over the
    image's border patches (``forward`` returns the prompted image, normalised as the model
    expects it). The library is inverted once (``PatchInverse``): since the mixing weights sum
    to 1 and the patch embedding is affine, the mixture of the library's patches embeds to the
    mixture of its tokens, exactly where the embedding is invertible.

    Args:
        model: a ``PromptedViT`` whose active subnet has PGN with ``placement: border``.
        mean, std: the model's input normalisation (pixels are in [0, 1]).
        bits: quantisation of the pasted pixels (None: none); ``clip``: clip them to [0, 1].
    """

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        bits: int | None = 8,
        clip: bool = True,
    ) -> None:
        super().__init__()
        import copy

        found = [m for m in model.prompt_modules.values() if m.invertible and m.active]
        if len(found) != 1:
            raise NasError(
                "the model's active subnet has no PGN to export"
                if not found
                else f"{[m.kind for m in found]}: one input-space prompt module deploys at a time"
            )
        (pgn,) = found
        prompts, library, generator, resolution, placement = pgn.active
        if placement != "border":
            raise NasError(
                "only PGN with placement: border deploys as pixels (placement: tokens adds "
                "tokens that no input image can carry); train with placement: border"
            )
        inverse = PatchInverse(model.backbone)
        self.exact = inverse.exact
        self.generator = copy.deepcopy(pgn.generators[generator])
        weight, bias = pgn._output(generator, prompts, library)
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", bias.detach().clone())
        patches = inverse.patches(pgn.library[:library].detach()).to(pgn.library.dtype)
        self.register_buffer("library_patches", patches)  # (M, C, p, p), normalised
        self.resolution, self.patch = resolution, inverse.patch
        grid = tuple(model.backbone.patch_embed.grid_size)
        self.positions = [divmod(i, grid[1]) for i in border_patches(grid)[:prompts]]
        self.mean, self.std, self.bits, self.clip = tuple(mean), tuple(std), bits, clip

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """The prompt patches for ``images``: (B, L, C, p, p), normalised, as pasted."""
        small = images
        if images.shape[-1] != self.resolution or images.shape[-2] != self.resolution:
            small = nn.functional.interpolate(
                images, size=(self.resolution,) * 2, mode="bilinear", align_corners=False
            )
        features = self.generator(small)
        mixing = (torch.einsum("bf,lmf->blm", features, self.weight) + self.bias).softmax(-1)
        patches = torch.einsum("blm,mchw->blchw", mixing, self.library_patches)
        if not self.clip and self.bits is None:
            return patches
        return to_pixels(patches, self.mean, self.std, self.bits, clip=self.clip)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patches(images)
        out, p = images.clone(), self.patch
        for i, (row, col) in enumerate(self.positions):
            out[:, :, row * p : (row + 1) * p, col * p : (col + 1) * p] = patches[:, i]
        return out
