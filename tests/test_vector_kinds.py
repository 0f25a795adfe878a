"""SSF, bias tuning and IA3 (issue 40): per-layer sets of operations as choices, exact parameter
counts against the built tensors, no added matmul FLOPs, every operation a site, folded into
the frozen weights with the same logits (biases created where timm has none), saved and
loaded, and one clear error for a bad space."""

from __future__ import annotations

import random

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nas.core.errors import ConfigError, NasError
from nas.core.yamlio import parse_yaml
from nas.families.vit.model import PromptedViT
from nas.families.vit.spec import BackboneSpec
from nas.modules import module_class
from nas.modules.vectors_kind import ALL
from nas.space.cost import added_flops, subnet_params
from nas.space.search_space import load_space, parse_space
from nas.space.subnet import Subnet
from tests.conftest import SMALL, randomise_modules, small_space_yaml

VECTORS = """
  ssf: {targets: [none, all, qkv+fc1, [norm1, norm2]], depths: [2, 4]}
  bitfit: {targets: [none, all, proj], depths: [4]}
  ia3: {targets: [none, all, qkv+fc2.in], depths: [4]}
"""
BACKBONES = {
    "biased": BackboneSpec("vit_tiny_patch16_224", SMALL),
    # no bias on qkv: folding creates the frozen bias it adds to
    "unbiased": BackboneSpec("vit_tiny_patch16_224", {**SMALL, "qkv_bias": False}),
}


def build(name: str, seed: int = 0):
    spec = BACKBONES[name]
    space = parse_space(parse_yaml(small_space_yaml(spec.model, spec.overrides, VECTORS)))
    torch.manual_seed(seed)
    model = PromptedViT.supernet(space, 5, spec.create(5)).eval()
    randomise_modules(model)
    return space, model


def test_sets_of_operations_are_the_choices():
    space, _ = build("biased")
    ssf = space.modules["ssf"]
    assert ssf.dims == (0, 0b000101, 0b110000, ALL) and ssf.capacity() == (ALL,) * 4
    assert ssf.count() == 4**4  # depth 2 is depth 4 with trailing nones
    subnet = Subnet.from_data({"ssf": {"depth": 2, "dims": ["qkv+fc1", "all"]}})
    assert str(subnet) == "ssf=[qkv+fc1,all]" and subnet["ssf"] == (0b101, ALL)
    assert Subnet.from_data(subnet.to_data()) == subnet
    g = space.geometry
    assert subnet_params(subnet, g) == 2 * (3 * g.width + g.mlp_hidden) + 2 * (
        3 * g.width + 4 * g.width + g.mlp_hidden
    )
    largest = space.modules["bitfit"].largest(g)
    assert largest == (ALL,) * 4  # the most operations, not the largest bitmask


@pytest.mark.parametrize("name", list(BACKBONES))
def test_export_merge_and_exact_counts(name):
    space, model = build(name)
    x = torch.randn(2, 3, 32, 32)
    rng = random.Random(1)
    for _ in range(6):
        subnet = space.sample(rng)
        model.set_subnet(subnet)
        with torch.no_grad():
            expected = model(x)
            alone, merged = model.export(), model.export(merge=True)
            torch.testing.assert_close(alone(x), expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
        held = sum(p.numel() for p in alone.prompt_modules.parameters())
        assert held == subnet_params(subnet, model.geometry), subnet
        kept = Subnet({k: v for k, v in subnet.items() if k in ("vpt", "adapter")})
        assert set(merged.prompt_modules) == set(kept)  # LoRA, SSF, BitFit and IA3 folded in
        assert not any(p.requires_grad for p in merged.backbone.blocks.parameters())


def test_each_operation_is_a_site_and_adds_no_matmul_flops():
    _, model = build("biased")
    x = torch.randn(1, 3, 32, 32)
    model.set_subnet(Subnet())
    with torch.no_grad():
        plain = model(x)
        for kind in ("ssf", "bitfit", "ia3"):
            for i, op in enumerate(module_class(kind).targets):
                subnet = Subnet({kind: (1 << i,) * 4})
                model.set_subnet(subnet)
                assert not torch.allclose(model(x), plain, atol=1e-4), (kind, op)
                counter = FlopCounterMode(display=False)
                with sdpa_kernel([SDPBackend.MATH]), counter:
                    model(x)
                model.set_subnet(Subnet())
                floor = FlopCounterMode(display=False)
                with sdpa_kernel([SDPBackend.MATH]), floor:
                    model(x)
                assert counter.get_total_flops() == floor.get_total_flops()
                assert added_flops(subnet, model.geometry) == 0


def test_sets_rank_by_their_parameters_not_their_bitmask():
    extra = "  ssf: {targets: [fc1+fc2, norm1+norm2+proj], depths: [4]}"
    space = parse_space(parse_yaml(small_space_yaml(extra=extra)))
    ssf, g = space.modules["ssf"], space.geometry
    small, large = Subnet({"ssf": ssf.smallest(g)}), Subnet({"ssf": ssf.largest(g)})
    assert str(large) == "ssf=(fc1+fc2)x4"  # 2 x (4 D + D) per layer, against 2 x 3 D
    assert subnet_params(small, g) < subnet_params(large, g)


def test_a_merged_model_is_not_saved_as_prompt_weights(tmp_path):
    _, model = build("biased")
    model.set_subnet(Subnet({"bitfit": (ALL,) * 4}))
    merged = model.export(merge=True)
    with pytest.raises(NasError, match="save before merging"):
        merged.save(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_bitfit_leaves_the_frozen_biases_and_starts_at_zero():
    space, _ = build("biased")
    torch.manual_seed(0)
    spec = BACKBONES["biased"]
    model = PromptedViT.supernet(space, 5, spec.create(5)).eval()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.set_subnet(Subnet())
        plain = model(x)
        model.set_subnet(Subnet({"bitfit": (ALL,) * 4}))
        assert torch.equal(model(x), plain)  # zero deltas change nothing
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())


def test_save_and_load_round_trip(tmp_path):
    _, model = build("biased")
    subnet = Subnet.from_data(
        {"ssf": {"depth": 3, "dims": ["all", 0, "norm1+norm2"]}, "bitfit": [48, 2]}
    )
    model.set_subnet(subnet)
    x = torch.randn(2, 3, 32, 32)
    folder = model.save(tmp_path / "m")
    assert "norm1+norm2" in (folder / "subnet.yaml").read_text()
    torch.manual_seed(0)  # the random backbone build() made
    back = PromptedViT.load(folder, BACKBONES["biased"].create(5)).eval()
    assert back.subnet == subnet
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("module", "message"),
    [
        ("ssf: {targets: [qkv, attn], depths: [2]}", "modules.ssf.targets[1]: 'attn' is not"),
        ("ssf: {targets: [none], depths: [2]}", "modules.ssf.targets: only 'none'"),
        ("bitfit: {targets: all, depths: [2]}", "modules.bitfit.targets: expected a list"),
        ("bitfit: {targets: [all], depths: [9]}", "modules.bitfit.depths[0]: depth 9 is above"),
        ("ia3: {targets: [all], depths: [0]}", "modules.ia3.depths: only 0 (absent)"),
        (
            "ssf: {dims: [0, 1], depths: [2]}",
            "modules.ssf.dims: unknown key; expected one of: targets",
        ),
    ],
)
def test_a_bad_space_is_one_error_naming_the_key(module, message):
    text = small_space_yaml(extra="").replace("modules:", f"modules:\n  {module}", 1)
    with pytest.raises(ConfigError) as err:
        parse_space(parse_yaml(text))
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("name", "budget"),
    [
        ("noah_extended_cpu", 40_000),
        ("noah_extended_vtab", 430_000),
        ("noah_extended_vtab_gps", 220_000),
    ],
)
def test_the_shipped_extended_spaces_validate(name, budget):
    space = load_space(name)
    assert {"ssf", "bitfit", "ia3"} <= set(space.modules)
    assert space.budget.params.high == budget and space.admits(space.smallest())
    assert str(Subnet({"ia3": (0b1001,) * 2})) == "ia3=(qkv+fc2.in)x2"
