"""The value types every module kind and tower adapter shares (a leaf: imports nothing of
the project): a tower's geometry, the token layout, the sites of a block and the injection
interface.

A prompt module acts at one or more *sites* of block ``i`` (``SITES``):

- ``tokens``: the token sequence entering block ``i`` (insert, replace or remove prompt tokens);
- an operation's output, given its input: ``qkv`` (the fused query/key/value projection),
  ``proj`` (attention's output projection), ``fc1`` and ``fc2`` (the MLP's linear layers),
  ``norm1`` and ``norm2`` (the LayerNorms before attention and before the MLP), ``mlp`` (the
  whole MLP, before the block's residual add);
- an operation's input: ``qkv.in``, ``proj.in``, ``fc1.in``, ``fc2.in`` (what enters that
  linear layer).

An ``Injector`` (the prompted model) answers those calls; a tower adapter declares where each
operation is in one concrete tower implementation and calls the injector there, only at the
sites some module uses. ``TimmViTTower`` adapts timm's VisionTransformer with forward hooks and
its own loop over the blocks, so timm's code is not edited and the backbone's state-dict keys
stay unchanged. Another tower (open_clip's ``nn.MultiheadAttention`` blocks) needs only another
adapter, not copies of the modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # only annotations here: describing a space (geometry, sites) loads no torch
    import torch


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
    #: a CLIP's text tower (0 without one): its width and context length in tokens
    text_width: int = 0
    text_context: int = 0

    @property
    def seq_len(self) -> int:
        """Tokens per image entering the first block, without prompts."""
        return self.num_prefix_tokens + self.num_patches

    @property
    def grid(self) -> tuple[int, int]:
        """Rows and columns of the patch grid (square images)."""
        side = round(self.num_patches**0.5)
        return side, side

    @property
    def image_size(self) -> int:
        """The side of the square input image in pixels."""
        return self.patch_size * self.grid[0]


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
        import torch  # heavy; only a forward pass gets here, with torch loaded (see the top)

        return torch.cat((x[:, :start], tokens, x[:, start + old :]), dim=1)

    def strip(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` without any prompt tokens (unchanged, not copied, when there are none)."""
        total = self.num_prompts
        if total == 0:
            return x
        import torch  # heavy; only a forward pass gets here, with torch loaded (see the top)

        return torch.cat((x[:, : self.num_prefix], x[:, self.num_prefix + total :]), dim=1)


#: The operations of a block whose output (and, for the linear ones, input) is a site.
OPERATIONS = ("qkv", "proj", "fc1", "fc2", "norm1", "norm2", "attn", "mlp")
#: The linear operations (a weight and a bias; their input is a site too, ``OP.in``).
LINEAR = ("qkv", "proj", "fc1", "fc2")
#: Every site a module kind may name in its ``sites``.
SITES = frozenset({"tokens", *OPERATIONS, *(f"{op}.in" for op in LINEAR)})


def input_site(op: str) -> str:
    """The site of ``op``'s input."""
    return f"{op}.in"


class Injector(Protocol):
    """What a tower adapter calls at each site of block ``layer``."""

    def used_sites(self) -> frozenset[str]:
        """The sites some module acts at: the only ones the tower calls."""
        ...

    def tokens(self, layer: int, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor: ...

    def site_in(self, layer: int, op: str, x: torch.Tensor) -> torch.Tensor:
        """What enters operation ``op`` of block ``layer`` instead of ``x``."""
        ...

    def site_out(self, layer: int, op: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """What operation ``op`` of block ``layer`` gives instead of ``out`` (its input ``x``)."""
        ...


class Weights(Protocol):
    """A linear operation's or a LayerNorm's frozen weights, as merging updates them."""

    weight: torch.Tensor
    bias: torch.Tensor | None
