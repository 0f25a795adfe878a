"""The weight-entangled supernet on small timm ViTs: exactness, freezing, no allocation."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from nas.core.errors import NasError
from nas.families.vit.model import PromptedViT
from nas.space.cost import added_flops, seq_lens, subnet_params
from nas.space.subnet import Subnet
from tests.conftest import VARIANTS, randomise_modules, space_for
from trainers.optim import build_optimizer, train_step

SUBNETS = [
    Subnet({"vpt": [2, 0, 3], "lora": [4, 1], "adapter": [8, 0, 3]}),
    Subnet({"vpt": [3], "lora": [1, 1, 4, 4]}),
    Subnet({"adapter": [3, 3, 8]}),
    Subnet({"vpt": [0, 0, 0, 2]}),
]


def build(variant: str, num_classes: int = 5):
    spec = VARIANTS[variant]
    space = space_for(spec)
    backbone = spec.create(num_classes)
    clean = copy.deepcopy(backbone).eval()  # the backbone as timm built it, without modules
    model = PromptedViT.supernet(space, num_classes, backbone).eval()
    randomise_modules(model)
    return space, model, clean


def images(variant: str, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_empty_subnet_is_exactly_the_frozen_backbone(variant):
    _, model, clean = build(variant)
    x = images(variant)
    model.set_subnet(Subnet())
    with torch.no_grad():
        assert torch.equal(model(x), clean(x))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_supernet_matches_standalone_export_and_merged_lora(variant):
    _, model, _ = build(variant)
    x = images(variant)
    for subnet in SUBNETS:
        model.set_subnet(subnet)
        with torch.no_grad():
            expected = model(x)
            standalone = model.export()
            merged = model.export(merge=True)
            assert torch.allclose(standalone(x), expected, atol=1e-5, rtol=1e-5), subnet
            assert torch.allclose(merged(x), expected, atol=1e-5, rtol=1e-5), subnet
        # The export holds only the subnet's slices, allocated at exactly its sizes.
        held = sum(p.numel() for p in standalone.prompt_modules.parameters())
        assert held == subnet_params(subnet, model.geometry)
        assert "lora" not in merged.prompt_modules
        assert sum(p.numel() for p in merged.prompt_modules.parameters()) == subnet_params(
            Subnet({k: v for k, v in subnet.items() if k != "lora"}), model.geometry
        )
        # Exporting leaves the supernet as it was: same subnet, same logits.
        with torch.no_grad():
            assert torch.equal(model(x), expected)


def test_lora_is_exact_at_initialisation():
    """B starts at zero: a fresh LoRA-only supernet equals the backbone for every rank."""
    spec = VARIANTS["cls-token"]
    backbone = spec.create(5)
    clean = copy.deepcopy(backbone).eval()
    model = PromptedViT.supernet(space_for(spec), 5, backbone).eval()
    model.set_subnet(Subnet({"lora": [4, 1, 4, 1]}))
    x = images("cls-token")
    with torch.no_grad():
        assert torch.equal(model(x), clean(x))


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def test_switching_subnets_allocates_and_copies_nothing():
    _, model, _ = build("cls-token")
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    rng = random.Random(0)
    space = space_for(VARIANTS["cls-token"])
    with _CountOps() as counter:
        for _ in range(20):
            model.set_subnet(space.sample(rng))
    assert counter.ops == []  # not one tensor operation, let alone an allocation
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers
    # A layer's active weights are views into the supernet's storage.
    model.set_subnet(Subnet({"lora": [1, 4]}))
    lora = model.prompt_modules["lora"]
    sliced = lora.sliced(1, 4)
    assert sliced["A"].data_ptr() == lora.layers["1"].A.data_ptr()
    assert (
        sliced["A"].untyped_storage().data_ptr() == lora.layers["1"].A.untyped_storage().data_ptr()
    )


def test_optimizer_step_touches_only_modules_and_head():
    _, model, _ = build("cls-token")
    subnet = Subnet({"vpt": [2, 0, 3], "lora": [1, 4], "adapter": [3, 0, 3]})
    model.set_subnet(subnet)
    frozen = {
        n: p.detach().clone()
        for n, p in model.backbone.named_parameters()
        if not n.startswith("head.")
    }
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = build_optimizer(model, lr=1e-2)
    x, y = images("cls-token", 8), torch.randint(0, 5, (8,))
    train_step(model, x, y, optimizer)

    for name, p in model.backbone.named_parameters():
        if name.startswith("head."):
            assert p.requires_grad
            continue
        assert not p.requires_grad and p.grad is None, name
        assert torch.equal(p, frozen[name]), f"backbone weight {name} changed"
    changed = {
        n
        for n, p in model.named_parameters()
        if p.requires_grad and not torch.equal(p, trainable[n])
    }
    assert "backbone.head.weight" in changed
    for n in (
        "prompt_modules.vpt.layers.0.prompts",
        "prompt_modules.lora.layers.1.A",
        "prompt_modules.adapter.layers.2.down_weight",
    ):
        assert n in changed, n

    # Gradients of unused slices are zero; of used slices, not.
    mods = model.prompt_modules
    vpt0 = mods["vpt"].layers["0"].prompts.grad
    assert vpt0[:2].abs().sum() > 0 and torch.count_nonzero(vpt0[2:]) == 0
    vpt1 = mods["vpt"].layers["1"].prompts.grad  # layer 1 has dim 0: not used at all
    assert vpt1 is None or torch.count_nonzero(vpt1) == 0
    vpt3 = mods["vpt"].layers["3"].prompts.grad  # beyond the depth
    assert vpt3 is None or torch.count_nonzero(vpt3) == 0
    lora0 = mods["lora"].layers["0"]
    assert (
        torch.count_nonzero(lora0.A.grad[1:]) == 0 and torch.count_nonzero(lora0.B.grad[:, 1:]) == 0
    )
    assert lora0.B.grad[:, :1].abs().sum() > 0
    ad0 = mods["adapter"].layers["0"]
    assert torch.count_nonzero(ad0.down_weight.grad[3:]) == 0
    assert torch.count_nonzero(ad0.down_bias.grad[3:]) == 0
    assert torch.count_nonzero(ad0.up_weight.grad[:, 3:]) == 0
    assert ad0.up_weight.grad[:, :3].abs().sum() > 0


def _block_inputs(model, x):
    """The token sequence entering each block, and entering the final norm."""
    seen = []
    handles = [
        b.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
        for b in model.backbone.blocks
    ]
    handles.append(
        model.backbone.norm.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    )
    outputs = []
    handles += [
        b.register_forward_hook(lambda m, a, o: outputs.append(o.detach()))
        for b in model.backbone.blocks
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen[:-1], seen[-1], outputs


@pytest.mark.parametrize("variant", ["cls-token", "registers", "no-cls", "avg-pool"])
def test_vpt_semantics(variant):
    _, model, _ = build(variant)
    g = model.geometry
    prefix, base = g.num_prefix_tokens, g.seq_len
    subnet = Subnet({"vpt": [2, 0, 3]})
    model.set_subnet(subnet)
    x = images(variant, 2)
    inputs, final, outputs = _block_inputs(model, x)
    prompts = model.prompt_modules["vpt"].layers

    # Lengths: inserted at layer 0, carried through the dim-0 layer 1, replaced at layer 2,
    # carried after the last prompted layer, dropped before the final norm and pooling.
    assert [t.shape[1] for t in inputs] == [base + 2, base + 2, base + 3, base + 3]
    assert [t.shape[1] for t in inputs] == seq_lens(subnet, g)
    assert final.shape[1] == base
    # Prompts sit right after the prefix tokens (class and register tokens).
    assert torch.equal(
        inputs[0][:, prefix : prefix + 2], prompts["0"].prompts[:2].expand(2, -1, -1)
    )
    assert torch.equal(
        inputs[2][:, prefix : prefix + 3], prompts["2"].prompts[:3].expand(2, -1, -1)
    )
    # At the dim-0 layer the sequence is block 0's output unchanged (prompts carried through);
    # at layer 2 the previous prompts are removed and the rest is block 1's output.
    assert torch.equal(inputs[1], outputs[0])
    assert torch.equal(inputs[2][:, :prefix], outputs[1][:, :prefix])
    assert torch.equal(inputs[2][:, prefix + 3 :], outputs[1][:, prefix + 2 :])
    assert torch.equal(inputs[3], outputs[2])
    # The final norm sees the prefix and patch tokens of the last block's output only.
    assert torch.equal(final[:, :prefix], outputs[3][:, :prefix])
    assert torch.equal(final[:, prefix:], outputs[3][:, prefix + 3 :])


def test_prompts_do_not_enter_attention_pooling():
    """With attention pooling, the pool sees the same tokens with or without prompts."""
    _, model, _ = build("attn-pool")
    seen = []
    h = model.backbone.attn_pool.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    for subnet in (Subnet(), Subnet({"vpt": [3, 3]})):
        model.set_subnet(subnet)
        with torch.no_grad():
            model(images("attn-pool"))
    h.remove()
    assert seen[0].shape == seen[1].shape
    assert seen[0].shape[1] in (model.geometry.num_patches, model.geometry.seq_len)


@pytest.mark.parametrize("variant", ["cls-token", "registers"])
def test_added_flops_equal_torch_flop_counter(variant):
    space, model, _ = build(variant)
    x = images(variant, 1)

    def counted(m):
        # The math kernel: torch's counter does not see every fused attention kernel (the
        # CPU flash kernel is uncounted in torch 2.14), and the FLOPs are the same.
        counter = FlopCounterMode(display=False)
        with sdpa_kernel([SDPBackend.MATH]), counter, torch.no_grad():
            m(x)
        return counter.get_total_flops()

    model.set_subnet(Subnet())
    floor = counted(model)
    for subnet in [*SUBNETS, space.largest()]:
        model.set_subnet(subnet)
        assert counted(model) - floor == added_flops(subnet, model.geometry), subnet
        merged = model.export(merge=True)
        assert counted(merged) - floor == added_flops(subnet, model.geometry, merged=True)


def test_geometry_mismatch_and_unsupported_models_are_refused():
    space = space_for(VARIANTS["cls-token"])
    other = VARIANTS["cls-token"].create(5, embed_dim=24)
    with pytest.raises(NasError, match="does not match"):
        PromptedViT.supernet(space, 5, other)
    import timm

    with pytest.raises(NasError, match="not a timm VisionTransformer"):
        PromptedViT(timm.create_model("resnet10t", num_classes=3), {})
    model = PromptedViT.supernet(space, 5)
    with pytest.raises(ValueError, match="exceeds the allocated capacity"):
        model.set_subnet(Subnet({"lora": [7]}))


def test_export_and_new_modules_follow_the_backbone_dtype():
    """Exports and modules are created where the source lives (float64 here; CUDA alike)."""
    spec = VARIANTS["cls-token"]
    model = PromptedViT.supernet(space_for(spec), 5, spec.create(5).double()).eval()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    randomise_modules(model)
    model.set_subnet(SUBNETS[0])
    x = images("cls-token").double()
    with torch.no_grad():
        for export in (model.export(), model.export(merge=True)):
            assert all(p.dtype == torch.float64 for p in export.parameters())
            assert torch.allclose(export(x), model(x), atol=1e-10)
