"""Prompt inversion through the patch embedding: exact where it is invertible, least squares
where it is not, and what clipping and 8-bit quantisation cost."""

from __future__ import annotations

import timm
import torch

from nas.inversion import PatchInverse, to_pixels


def vit(in_chans: int, patch: int, width: int) -> torch.nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224",
        img_size=4 * patch,
        patch_size=patch,
        in_chans=in_chans,
        embed_dim=width,
        depth=1,
        num_heads=3,
        num_classes=2,
    )


def test_invertible_patch_embedding_round_trips_exactly():
    model = vit(3, 8, 192)  # 3·8·8 = 192 -> 192, random weights
    inverse = PatchInverse(model)
    assert inverse.exact
    tokens = torch.randn(5, 192)
    assert inverse.reconstruction_error(tokens) < 1e-8
    # the patches really embed to the tokens through the model's own convolution
    patches = inverse.patches(tokens).float()
    with torch.no_grad():
        embedded = model.patch_embed.proj(patches).flatten(1)
    assert torch.allclose(embedded, tokens, atol=1e-4)


def test_non_invertible_patch_embedding_is_a_least_squares_projection():
    inverse = PatchInverse(vit(1, 7, 192))  # the committed backbone's shape: 49 -> 192
    assert not inverse.exact and inverse.rank == 49
    tokens = torch.randn(5, 192)
    error = inverse.reconstruction_error(tokens)
    assert 0.5 < error < 1.0  # most of a random token is outside a 49-dim span
    # reachable tokens (embeddings of real patches) come back exactly: a projection
    reachable = inverse.tokens(torch.randn(5, 1, 7, 7))
    assert inverse.reconstruction_error(reachable) < 1e-8


def test_pixels_are_clipped_and_quantised():
    mean, std = (0.5,), (0.25,)
    patches = torch.linspace(-3, 3, 49).reshape(1, 7, 7)
    pixels = to_pixels(patches, mean, std) * 0.25 + 0.5
    assert pixels.min() == 0.0 and pixels.max() == 1.0
    assert torch.allclose(pixels * 255, torch.round(pixels * 255), atol=1e-5)
    unquantised = to_pixels(patches, mean, std, bits=None)
    inside = (patches * 0.25 + 0.5 >= 0) & (patches * 0.25 + 0.5 <= 1)
    assert torch.allclose(unquantised[inside], patches[inside])
