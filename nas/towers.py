"""The per-block injection interface between prompt modules and a transformer tower.

A prompt module acts at one or more *sites* of block ``i``:

- ``tokens``: the token sequence entering block ``i`` (insert, replace or remove prompt tokens);
- ``qkv``: the fused query/key/value projection of block ``i``'s attention (add a delta);
- ``mlp``: the output of block ``i``'s MLP, before the block's residual add.

An ``Injector`` (the prompted model) answers those calls; a tower adapter calls it at the right
places of one concrete tower implementation. ``TimmViTTower`` adapts timm's VisionTransformer with
forward hooks on ``attn.qkv`` and ``mlp`` and its own loop over the blocks, so timm's code is not
edited and the backbone's state-dict keys stay unchanged. Another tower (open_clip's
``nn.MultiheadAttention`` blocks) needs only another adapter, not copies of the modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from nas.errors import NasError


@dataclass
class TokenLayout:
    """Where prompt tokens sit in the sequence: after the prefix tokens (class, registers),
    one segment per owning module, in the order the segments were first inserted."""

    num_prefix: int
    segments: dict[str, int] = field(default_factory=dict)
    #: the (normalised) input images, for modules whose prompts depend on them (PGN)
    images: torch.Tensor | None = None
    #: the patch grid (rows, columns) and the patches' positional embeddings (N, D), for
    #: modules that put prompts at patch positions
    grid: tuple[int, int] = (0, 0)
    patch_pos: torch.Tensor | None = None

    @property
    def num_prompts(self) -> int:
        return sum(self.segments.values())

    def replace(self, x: torch.Tensor, owner: str, tokens: torch.Tensor) -> torch.Tensor:
        """Replace ``owner``'s prompt tokens in ``x`` (B, N, D) with ``tokens`` (B, P, D)."""
        start = self.num_prefix
        for name, count in self.segments.items():
            if name == owner:
                break
            start += count
        old = self.segments.get(owner, 0)
        self.segments[owner] = tokens.shape[1]
        return torch.cat((x[:, :start], tokens, x[:, start + old :]), dim=1)

    def strip(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` without any prompt tokens (unchanged, not copied, when there are none)."""
        total = self.num_prompts
        if total == 0:
            return x
        return torch.cat((x[:, : self.num_prefix], x[:, self.num_prefix + total :]), dim=1)


class Injector(Protocol):
    """What a tower adapter calls at each site of block ``layer``."""

    def tokens(self, layer: int, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor: ...

    def qkv_delta(self, layer: int, x: torch.Tensor) -> torch.Tensor | None: ...

    def mlp_out(self, layer: int, h: torch.Tensor) -> torch.Tensor: ...


class HookedTower:
    """What the tower adapters share: forward hooks that call the injector, attached and
    detached together (an export copies the model without them)."""

    def __init__(self, model: nn.Module, injector: Injector) -> None:
        self.check(model)
        self.model = model
        self.injector = injector
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.attach()

    @staticmethod
    def check(model: nn.Module) -> None:
        raise NotImplementedError

    def hooks(self) -> list[tuple[nn.Module, Callable]]:
        """(submodule, forward hook) pairs to attach."""
        raise NotImplementedError

    def attach(self) -> None:
        if not self._handles:
            self._handles = [m.register_forward_hook(h) for m, h in self.hooks()]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _mlp_hook(self, layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return self.injector.mlp_out(layer, output)

        return hook


class TimmViTTower(HookedTower):
    """Adapter for timm's ``VisionTransformer`` (vit_*, deit_*, custom sizes, register tokens,
    token/avg/attention pooling, with or without a class token)."""

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
            if not isinstance(getattr(attn, "qkv", None), nn.Linear) or mlp is None:
                raise NasError(
                    f"{type(model).__name__}.blocks[{i}] ({type(block).__name__}) has no fused "
                    "attn.qkv Linear and mlp; this block type is not supported"
                )

    def hooks(self) -> list[tuple[nn.Module, Callable]]:
        out = []
        for i, block in enumerate(self.model.blocks):
            out += [(block.attn.qkv, self._qkv_hook(i)), (block.mlp, self._mlp_hook(i))]
        return out

    def _qkv_hook(self, layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            delta = self.injector.qkv_delta(layer, args[0])
            return output if delta is None else output + delta

        return hook

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

    def qkv_linear(self, layer: int) -> nn.Linear:
        return self.model.blocks[layer].attn.qkv


class _FusedQKV:
    """What LoRA merging needs of a fused qkv projection held as a bare parameter."""

    def __init__(self, weight: nn.Parameter) -> None:
        self.weight = weight


class OpenClipViTTower(HookedTower):
    """Adapter for open_clip's own ``VisionTransformer`` (the OpenAI and LAION CLIP image
    towers): blocks of ``nn.MultiheadAttention`` with a fused ``in_proj_weight``, class-token
    pooling, ``ln_post`` and the projection. The attention is computed here from the block's own
    weights, so that the ``qkv`` site can add its delta to the fused projection; the ``mlp`` site
    is a forward hook on each block's MLP."""

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

    def hooks(self) -> list[tuple[nn.Module, Callable]]:
        return [(b.mlp, self._mlp_hook(i)) for i, b in enumerate(self.model.transformer.resblocks)]

    def _block(self, layer: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        attn = block.attn
        h = block.ln_1(x)
        qkv = nn.functional.linear(h, attn.in_proj_weight, attn.in_proj_bias)
        delta = self.injector.qkv_delta(layer, h)
        if delta is not None:
            qkv = qkv + delta
        b, n, d = h.shape
        heads = attn.num_heads
        q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in qkv.chunk(3, -1))
        o = nn.functional.scaled_dot_product_attention(q, k, v)
        o = attn.out_proj(o.transpose(1, 2).reshape(b, n, d))
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

    def qkv_linear(self, layer: int) -> _FusedQKV:
        return _FusedQKV(self.model.transformer.resblocks[layer].attn.in_proj_weight)


def tower_for(model: nn.Module, injector: Injector) -> TimmViTTower | OpenClipViTTower:
    """The adapter for ``model``: open_clip's VisionTransformer, or timm's."""
    if OpenClipViTTower.is_tower(model):
        return OpenClipViTTower(model, injector)
    return TimmViTTower(model, injector)
