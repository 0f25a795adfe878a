"""Exact costs of a subnet, computed from the tower geometry without building a model.

- Trainable parameters: the prompt modules only. The classification head is counted apart
  (``head_params``): it trains in every method, and its size depends on the dataset.
- Added FLOPs: the matmul FLOPs (2 per multiply-accumulate, as ``torch.utils.flop_counter``
  counts them) that the modules add to one image's forward pass: prompt tokens lengthen every
  projection, attention and MLP of the blocks they pass through; LoRA adds its two low-rank
  products (nothing once merged into the frozen weights: ``merged``); adapters add their
  two projections; each kind states its own (``PromptModule.flops``). Element-wise work
  (activations, norms, residual adds) is not counted, as in the usual ViT FLOP figures.
"""

from __future__ import annotations

from nas.modules import kind_class
from nas.space.subnet import Subnet
from nas.towers.geometry import TowerGeometry


def block_flops(seq_len: int, g: TowerGeometry) -> int:
    """Matmul FLOPs of one timm ViT block on ``seq_len`` tokens."""
    n, d = seq_len, g.width
    qkv = 2 * n * d * 3 * d
    attention = 2 * 2 * n * n * d  # q @ k^T and attn @ v over all heads
    proj = 2 * n * d * d
    mlp = 2 * 2 * n * d * g.mlp_hidden
    return qkv + attention + proj + mlp


def seq_lens(subnet: Subnet, g: TowerGeometry) -> list[int]:
    """The sequence length entering each block under ``subnet``."""
    lens = [g.seq_len] * g.depth
    for kind, choice in subnet.items():
        for i, extra in enumerate(kind_class(kind).extra_tokens(choice, g)):
            lens[i] += extra
    return lens


def subnet_params(subnet: Subnet, g: TowerGeometry) -> int:
    """Exact trainable parameters of the subnet's prompt modules (head excluded)."""
    return sum(kind_class(kind).params(choice, g) for kind, choice in subnet.items())


def head_params(g: TowerGeometry, num_classes: int) -> int:
    """Parameters of a linear classification head (weight and bias)."""
    return g.width * num_classes + num_classes


def added_flops(subnet: Subnet, g: TowerGeometry, *, merged: bool = False) -> int:
    """Matmul FLOPs the subnet adds to one image's forward pass (``merged``: with the
    mergeable kinds folded into the frozen weights)."""
    lens = seq_lens(subnet, g)
    total = sum(block_flops(n, g) - block_flops(g.seq_len, g) for n in lens)
    for kind, choice in subnet.items():
        total += kind_class(kind).flops(choice, g, lens, merged)
    return total
