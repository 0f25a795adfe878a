"""Prompt inversion through the patch embedding: exact where it is invertible, least squares
where it is not, and what clipping and 8-bit quantisation cost."""

from __future__ import annotations

import timm
import torch

from nas.interop.inversion import PatchInverse, to_pixels


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


def rgb_model(placement: str = "border"):
    """A small RGB ViT whose patch embedding is invertible (3·8·8 = 192 = width), random
    weights, with a PGN subnet; and the same backbone unmodified, as a host would run it."""
    import copy

    from nas.core.yamlio import parse_yaml
    from nas.families.vit.model import PromptedViT
    from nas.space.search_space import parse_space
    from nas.space.subnet import Subnet

    text = """
backbone:
  model: vit_tiny_patch16_224
  overrides: {img_size: 32, patch_size: 8, embed_dim: 192, depth: 2, num_heads: 3}
modules:
  vpt: {dims: [0, 2], depths: [2]}
  pgn: {prompts: [3, 5], library: [8], resolutions: [16], placement: PLACEMENT}
""".replace("PLACEMENT", placement)
    space = parse_space(parse_yaml(text))
    backbone = space.backbone.create(4)
    host = copy.deepcopy(backbone).eval()
    model = PromptedViT.supernet(space, 4, backbone).eval()
    with torch.no_grad():
        model.prompt_modules["pgn"].library.normal_(0, 0.5)
        model.prompt_modules["pgn"].outputs["resnet10"].weight.normal_(0, 0.5)
    model.set_subnet(Subnet({"vpt": [2, 2], "pgn": (5, 8, "resnet10", 16, placement)}))
    return model, host


def test_rgb_deployed_prompts_reproduce_the_token_space_logits():
    from nas.interop.inversion import RGBPrompts
    from nas.space.subnet import Subnet

    model, host = rgb_model()
    model.set_subnet(Subnet({"pgn": (5, 8, "resnet10", 16, "border")}))  # pixels only: no VPT
    images = torch.randn(3, 3, 32, 32)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    exact = RGBPrompts(model, mean, std, bits=None, clip=False).eval()
    assert exact.exact
    with torch.no_grad():
        expected = model(images)
        prompted = exact(images)
        assert not torch.equal(prompted, images)  # the border patches carry the prompts
        # only the first 5 border patches changed: top row (4), then the right column's 2nd
        changed = (prompted != images).any(1).reshape(3, 4, 8, 4, 8).any(-1).any(-2)
        assert changed[0].flatten().nonzero().flatten().tolist() == [0, 1, 2, 3, 7]
        assert torch.allclose(host(prompted), expected, atol=1e-4)
        # The quantisation's effect, measured against the prompts' own effect on the logits
        # (the host without prompts): 8 bits move the logits by well under 1% of it, 4 bits
        # by more. (Clipping is another matter: these random prompts reach far outside
        # [0, 1]; its cost on a trained model is in BENCHMARKS.md.)
        effect = (host(images) - expected).abs().max()
        assert effect > 0.1

        def error(**kwargs) -> float:
            return (host(RGBPrompts(model, mean, std, **kwargs)(images)) - expected).abs().max()

        eight, four = error(bits=8, clip=False), error(bits=4, clip=False)
        assert 0 < eight < 0.01 * effect
        assert four > 4 * eight
        deployed = RGBPrompts(model, mean, std)(images)  # the default: clipped, 8 bits
        pixels = deployed[:, :, :8] * 0.5 + 0.5
        assert pixels.min() >= 0 and pixels.max() <= 1
        assert torch.allclose(pixels * 255, torch.round(pixels * 255), atol=1e-4)


def test_tokens_placement_cannot_be_deployed_as_pixels():
    import pytest

    from nas.core.errors import NasError
    from nas.interop.inversion import RGBPrompts

    model, _ = rgb_model("tokens")
    with pytest.raises(NasError, match="only PGN with placement: border deploys as pixels"):
        RGBPrompts(model, (0.5,) * 3, (0.5,) * 3)
