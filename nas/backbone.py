"""Backbones: which timm Vision Transformer to build, its geometry, and creating it.

A ``BackboneSpec`` names a timm model and optional architecture overrides (``img_size``,
``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``in_chans``, ``reg_tokens``,
``class_token``, ``global_pool``, ...). Its geometry (width, depth, tokens) is read off the
model built on the ``meta`` device, which allocates no memory and downloads nothing.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from torch import nn

from nas.errors import ConfigError


@dataclass(frozen=True)
class TowerGeometry:
    """The shape of a transformer tower that module sizes and costs depend on."""

    width: int  # embedding dimension D
    depth: int  # number of transformer blocks
    num_heads: int
    mlp_hidden: int  # hidden width of each block's MLP
    num_prefix_tokens: int  # class + register (+ distillation) tokens
    num_patches: int
    patch_size: int
    in_chans: int

    @property
    def seq_len(self) -> int:
        """Tokens per image entering the first block, without prompts."""
        return self.num_prefix_tokens + self.num_patches


@dataclass(frozen=True)
class BackboneSpec:
    """A timm model name plus architecture overrides passed to ``timm.create_model``."""

    model: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        return json.dumps({"model": self.model, "overrides": self.overrides}, sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model}
        if self.overrides:
            out["overrides"] = dict(self.overrides)
        return out

    def geometry(self) -> TowerGeometry:
        return _geometry(self.key())

    def create(self, num_classes: int, *, pretrained: bool = False, **kwargs: Any) -> nn.Module:
        """Build the model with a fresh ``num_classes`` head (random backbone unless pretrained)."""
        return timm.create_model(
            self.model,
            pretrained=pretrained,
            num_classes=num_classes,
            **{**self.overrides, **kwargs},
        )


def geometry_of(model: nn.Module) -> TowerGeometry:
    """Geometry of a built timm VisionTransformer."""
    from nas.towers import TimmViTTower  # local: towers imports this module

    TimmViTTower.check(model)
    block = model.blocks[0]
    patch = model.patch_embed.patch_size
    return TowerGeometry(
        width=int(model.embed_dim),
        depth=len(model.blocks),
        num_heads=int(block.attn.num_heads),
        mlp_hidden=int(block.mlp.fc1.out_features),
        num_prefix_tokens=int(model.num_prefix_tokens),
        num_patches=int(model.patch_embed.num_patches),
        patch_size=int(patch[0] if isinstance(patch, tuple | list) else patch),
        in_chans=int(model.patch_embed.proj.in_channels),
    )


@functools.lru_cache(maxsize=64)
def _geometry(spec_key: str) -> TowerGeometry:
    spec = json.loads(spec_key)
    name, overrides = spec["model"], spec.get("overrides", {})
    if name not in timm.list_models():
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"unknown timm model {name!r}{hint}", key="backbone.model")
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **overrides)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise ConfigError(
            f"timm cannot build {name!r} with these overrides: {exc}", key="backbone.overrides"
        ) from None
    try:
        return geometry_of(model)
    except ConfigError as exc:
        raise ConfigError(exc.message, key="backbone.model") from None
