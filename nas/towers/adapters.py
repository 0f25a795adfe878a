"""Tower adapters: where a concrete tower implementation calls the ``Injector``'s sites
(``nas.towers.geometry``) and what geometry it has. Each declares, as data, where every
operation of a block is (``OPERATIONS``: a path inside the block); hooks are attached at the
sites the injector uses, and nowhere else. ``TimmViTTower`` adapts timm's VisionTransformer,
``OpenClipViTTower`` open_clip's."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from nas.core.errors import NasError
from nas.towers.geometry import Injector, TokenLayout, TowerGeometry, input_site


class HookedTower:
    """What the tower adapters share: forward hooks (and pre-hooks, for an operation's input)
    that call the injector at the sites it uses, attached and detached together (an export
    copies the model without them; a merge that drops a kind re-attaches them)."""

    #: Where each operation of a block is (a path inside the block); None: the adapter
    #: computes it itself and calls the injector there.
    OPERATIONS: ClassVar[dict[str, str | None]]

    def __init__(self, model: nn.Module, injector: Injector) -> None:
        self.check(model)
        self.model = model
        self.injector = injector
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.attach()

    @staticmethod
    def check(model: nn.Module) -> None:
        raise NotImplementedError

    def blocks(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    def operation(self, layer: int, op: str) -> Any:
        """Block ``layer``'s operation ``op`` (a module, or what holds its weights)."""
        return self.blocks()[layer].get_submodule(self.OPERATIONS[op])

    def attach(self) -> None:
        if self._handles:
            return
        used = self.injector.used_sites()
        for layer, block in enumerate(self.blocks()):
            for op, path in self.OPERATIONS.items():
                if path is None:
                    continue
                module = block.get_submodule(path)
                if input_site(op) in used:
                    self._handles.append(module.register_forward_pre_hook(self._in(layer, op)))
                if op in used:
                    self._handles.append(module.register_forward_hook(self._out(layer, op)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _in(self, layer: int, op: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> tuple:
            return (self.injector.site_in(layer, op, args[0]), *args[1:])

        return hook

    def _out(self, layer: int, op: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return self.injector.site_out(layer, op, args[0], output)

        return hook


class TimmViTTower(HookedTower):
    """Adapter for timm's ``VisionTransformer`` (vit_*, deit_*, custom sizes, register tokens,
    token/avg/attention pooling, with or without a class token)."""

    OPERATIONS: ClassVar[dict[str, str | None]] = {
        "qkv": "attn.qkv",
        "proj": "attn.proj",
        "fc1": "mlp.fc1",
        "fc2": "mlp.fc2",
        "norm1": "norm1",
        "norm2": "norm2",
        "attn": "attn",
        "mlp": "mlp",
    }

    @staticmethod
    def check(model: nn.Module) -> None:
        """Raise NasError unless ``model`` has the structure this adapter relies on."""
        needed = (
            "patch_embed",
            "_pos_embed",
            "blocks",
            "norm",
            "forward_head",
            "num_prefix_tokens",
        )
        missing = [a for a in needed if not hasattr(model, a)]
        if missing:
            raise NasError(
                f"{type(model).__name__} is not a timm VisionTransformer "
                f"(missing: {', '.join(missing)}); prompt modules support timm vit_*/deit_* models"
            )
        for i, block in enumerate(model.blocks):
            attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
            linear = [getattr(attn, "qkv", None), getattr(attn, "proj", None)]
            linear += [getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)]
            if not all(isinstance(m, nn.Linear) for m in linear):
                raise NasError(
                    f"{type(model).__name__}.blocks[{i}] ({type(block).__name__}) has no fused "
                    "attn.qkv, attn.proj, mlp.fc1 and mlp.fc2 Linear layers; this block type "
                    "is not supported"
                )

    def blocks(self) -> Sequence[nn.Module]:
        return self.model.blocks

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits; the same operations as ``VisionTransformer.forward`` plus the token site."""
        m = self.model
        x = m.patch_embed(images)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        x = m.norm_pre(x)
        grid = tuple(m.patch_embed.grid_size)
        layout = TokenLayout(
            int(m.num_prefix_tokens),
            images=images,
            grid=grid,
            patch_pos=m.pos_embed[0, -grid[0] * grid[1] :] if m.pos_embed is not None else None,
        )
        for i, block in enumerate(m.blocks):
            x = self.injector.tokens(i, x, layout)
            x = block(x)
        # Prompt tokens never reach the final norm or the pooling (token, avg or attention).
        x = layout.strip(x)
        x = m.norm(x)
        return m.forward_head(x)

    def head_modules(self) -> list[nn.Module]:
        """The classifier head(s) that train together with the prompt modules."""
        heads = [self.model.head]
        if isinstance(getattr(self.model, "head_dist", None), nn.Module):
            heads.append(self.model.head_dist)
        return heads


class _FusedQKV:
    """A fused qkv projection held as bare parameters (``Weights``: what merging updates)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        self.weight = weight
        self.bias = bias


class OpenClipViTTower(HookedTower):
    """Adapter for open_clip's own ``VisionTransformer`` (the OpenAI and LAION CLIP image
    towers): blocks of ``nn.MultiheadAttention`` with a fused ``in_proj_weight``, class-token
    pooling, ``ln_post`` and the projection. The attention is computed here from the block's own
    weights, so that the ``qkv`` sites (its input and output) are called here; the others are
    hooks on the block's modules."""

    OPERATIONS: ClassVar[dict[str, str | None]] = {
        "qkv": None,  # the fused in_proj of nn.MultiheadAttention, computed in _block
        "proj": "attn.out_proj",
        "fc1": "mlp.c_fc",
        "fc2": "mlp.c_proj",
        "norm1": "ln_1",
        "norm2": "ln_2",
        "attn": None,  # the attention branch, computed in _block
        "mlp": "mlp",
    }

    @staticmethod
    def check(model: nn.Module) -> None:
        needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer")
        missing = [a for a in needed if not hasattr(model, a)]
        if missing or getattr(model, "attn_pool", None) is not None:
            raise NasError(
                f"{type(model).__name__} is not an open_clip VisionTransformer with class-token "
                f"pooling (missing: {', '.join(missing) or 'none'}; attentional pooling is not "
                "supported)"
            )
        for i, block in enumerate(model.transformer.resblocks):
            attn = getattr(block, "attn", None)
            if not isinstance(attn, nn.MultiheadAttention) or not attn.batch_first:
                raise NasError(
                    f"{type(model).__name__}.transformer.resblocks[{i}] has no batch-first "
                    "nn.MultiheadAttention; this block type is not supported"
                )

    @staticmethod
    def is_tower(model: nn.Module) -> bool:
        return hasattr(model, "conv1") and hasattr(model, "class_embedding")

    def blocks(self) -> Sequence[nn.Module]:
        return self.model.transformer.resblocks

    def operation(self, layer: int, op: str) -> Any:
        if op == "qkv":
            attn = self.blocks()[layer].attn
            return _FusedQKV(attn.in_proj_weight, attn.in_proj_bias)
        return super().operation(layer, op)

    def _block(self, layer: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        attn, used = block.attn, self.injector.used_sites()
        h = z = block.ln_1(x)
        if "qkv.in" in used:
            h = self.injector.site_in(layer, "qkv", h)
        qkv = nn.functional.linear(h, attn.in_proj_weight, attn.in_proj_bias)
        if "qkv" in used:
            qkv = self.injector.site_out(layer, "qkv", h, qkv)
        b, n, d = h.shape
        heads = attn.num_heads
        q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in qkv.chunk(3, -1))
        o = nn.functional.scaled_dot_product_attention(q, k, v)
        o = attn.out_proj(o.transpose(1, 2).reshape(b, n, d))
        if "attn" in used:
            o = self.injector.site_out(layer, "attn", z, o)
        x = x + block.ls_1(o)
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The projected image features, as ``VisionTransformer.forward`` returns them."""
        m = self.model
        x = m._embeds(images)
        grid = tuple(m.grid_size)
        layout = TokenLayout(
            1, images=images, grid=grid, patch_pos=m.positional_embedding[-grid[0] * grid[1] :]
        )
        for i, block in enumerate(m.transformer.resblocks):
            x = self.injector.tokens(i, x, layout)
            x = self._block(i, block, x)
        x = layout.strip(x)  # prompt tokens never reach ln_post or the pooling
        pooled, _ = m._pool(x)
        return pooled @ m.proj if m.proj is not None else pooled

    def head_modules(self) -> list[nn.Module]:
        return []  # CLIP classifies with its text tower


def tower_for(model: nn.Module, injector: Injector) -> TimmViTTower | OpenClipViTTower:
    """The adapter for ``model``: open_clip's VisionTransformer, or timm's."""
    if OpenClipViTTower.is_tower(model):
        return OpenClipViTTower(model, injector)
    return TimmViTTower(model, injector)


def geometry_of(model: nn.Module) -> TowerGeometry:
    """Geometry of a built timm VisionTransformer (or open_clip's)."""
    if OpenClipViTTower.is_tower(model):
        OpenClipViTTower.check(model)
        block = model.transformer.resblocks[0]
        grid = tuple(model.grid_size)
        return TowerGeometry(
            width=int(model.transformer.width),
            depth=len(model.transformer.resblocks),
            num_heads=int(block.attn.num_heads),
            mlp_hidden=int(block.mlp.c_fc.out_features),
            num_prefix_tokens=1,
            num_patches=int(grid[0] * grid[1]),
            patch_size=int(model.conv1.kernel_size[0]),
            in_chans=int(model.conv1.in_channels),
        )
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
