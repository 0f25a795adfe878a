"""Adapter+'s choices in the adapter kind (issue 40): the position (after the MLP, after the
attention, parallel to the MLP) and a learned channel-wise scaling, per layer, computing what
they say on a timm block; NOAH's adapter unchanged as the plain setting; exact counts, export
equal to the supernet, save/load, and one clear error for a bad space or choice."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import yaml
from torch.nn import functional as F

from nas.core.errors import ConfigError, NasError
from nas.core.yamlio import parse_yaml
from nas.families.vit.model import PromptedViT
from nas.families.vit.spec import BackboneSpec
from nas.modules.adapter_kind import AFTER_ATTN, PARALLEL, SCALED, AdapterOptions, compose
from nas.space.cost import added_flops, subnet_params
from nas.space.search_space import parse_space
from nas.space.subnet import Subnet
from tests.conftest import SMALL, randomise_modules, small_space_yaml

PLUS = "{dims: [0, 3, 8], depths: [0, 3], max_dim: 8, positions: [after_mlp, after_attn, parallel], scaling: [false, true]}"  # noqa: E501
SPEC = BackboneSpec("vit_tiny_patch16_224", SMALL)


def build(module: str = PLUS, seed: int = 0):
    text = small_space_yaml(extra="").replace(
        "  adapter: {dims: [0, 3, 8], depths: [0, 3], max_dim: 8}", f"  adapter: {module}"
    )
    space = parse_space(parse_yaml(text))
    torch.manual_seed(seed)
    model = PromptedViT.supernet(space, 5, SPEC.create(5)).eval()
    randomise_modules(model)
    return space, model


def test_noahs_adapter_is_the_plain_setting_unchanged():
    plain = parse_space(parse_yaml(small_space_yaml()))
    adapter = plain.modules["adapter"]
    assert adapter.dims == (0, 3, 8) and adapter.capacity() == (8, 8, 8)
    assert adapter.to_data() == {
        "dims": [0, 3, 8],
        "depths": [0, 3],
        "max_dim": 8,
        "options": {"dropout": 0.1},
    }
    subnet = Subnet({"adapter": (3, 8)})
    assert str(subnet) == "adapter=[3,8]" and subnet.to_data()["adapter"]["dims"] == [3, 8]
    model = PromptedViT.supernet(plain, 5, SPEC.create(5))
    assert model.prompt_modules["adapter"].sites == {"mlp"}  # no hook on the attention


def test_the_space_holds_every_position_and_scaling():
    space, model = build()
    adapter, g = space.modules["adapter"], space.geometry
    assert adapter.count() == (1 + 2 * 3 * 2) ** 3
    assert adapter.capacity() == (8 | AFTER_ATTN | PARALLEL | SCALED,) * 3
    assert adapter.to_data()["positions"] == ["after_mlp", "after_attn", "parallel"]
    assert adapter.to_data()["scaling"] == [False, True] and adapter.to_data()["dims"] == [0, 3, 8]
    assert model.prompt_modules["adapter"].sites == {"mlp", "attn"}
    largest = adapter.largest(g)
    assert all(v & SCALED and v & 0xFFFFFFFF == 8 for v in largest)  # the most parameters
    assert adapter.smallest(g) == ()


def test_choices_read_and_print():
    subnet = Subnet.from_data(
        {"adapter": {"depth": 3, "dims": ["8@parallel+scale", 0, "3@after_attn"]}}
    )
    assert subnet["adapter"] == (compose(8, "parallel", True), 0, compose(3, "after_attn"))
    assert str(subnet) == "adapter=[8@parallel+scale,0,3@after_attn]"
    assert Subnet.from_data(subnet.to_data()) == subnet
    uniform = Subnet.from_data(
        {"adapter": {"depth": 2, "dims": 8, "position": "after_attn", "scaling": True}}
    )
    assert str(uniform) == "adapter=(8@after_attn+scale)x2"
    assert Subnet.from_data({"adapter": ["8+scale", 3]})["adapter"] == (8 | SCALED, 3)


def _expected_block(block, adapter, value, x):
    """Block 0 computed by hand from its frozen modules and the adapter's weights."""
    dim = value & 0xFFFFFFFF
    w = adapter.sliced(0, value)

    def bottleneck(h):
        z = F.linear(h, w["down_weight"], w["down_bias"])
        z = F.linear(z * torch.sigmoid(1.702 * z), w["up_weight"], w["up_bias"])
        return z * w["scale"] if value & SCALED else z

    assert dim > 0
    a = block.attn(block.norm1(x))
    if value & AFTER_ATTN:
        a = a + bottleneck(a)
    x = x + block.ls1(a)
    z = block.norm2(x)
    m = block.mlp(z)
    if not value & AFTER_ATTN:
        m = m + bottleneck(z if value & PARALLEL else m)
    return x + block.ls2(m)


@pytest.mark.parametrize("position", ["after_mlp", "after_attn", "parallel"])
@pytest.mark.parametrize("scaled", [False, True])
def test_each_position_computes_what_it_says(position, scaled):
    _, model = build()
    with torch.no_grad():
        model.prompt_modules["adapter"].layers["0"].scale.uniform_(0.5, 1.5)
    value = compose(8, position, scaled)
    model.set_subnet(Subnet({"adapter": (value,)}))
    block = model.backbone.blocks[0]
    seen = {}
    block.register_forward_pre_hook(lambda m, args: seen.setdefault("in", args[0]))
    block.register_forward_hook(lambda m, args, out: seen.setdefault("out", out))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
        model.tower.detach()  # the frozen modules alone, for the hand computation
        expected = _expected_block(block, model.prompt_modules["adapter"], value, seen["in"])
        model.tower.attach()
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-5)


def test_scaling_starts_where_the_unscaled_adapter_does():
    _, model = build()
    with torch.no_grad():
        model.prompt_modules["adapter"].layers["0"].scale.fill_(1.0)
        x = torch.randn(2, 3, 32, 32)
        model.set_subnet(Subnet({"adapter": (compose(8, "parallel"),)}))
        unscaled = model(x)
        model.set_subnet(Subnet({"adapter": (compose(8, "parallel", True),)}))
        torch.testing.assert_close(model(x), unscaled)
        model.set_subnet(Subnet({"adapter": (8,)}))
        assert not torch.allclose(model(x), unscaled, atol=1e-4)  # the position matters


def test_export_equals_the_supernet_with_exact_counts_and_flops():
    space, model = build()
    rng = random.Random(3)
    x = torch.randn(2, 3, 32, 32)
    g = space.geometry
    for _ in range(8):
        subnet = space.sample(rng)
        model.set_subnet(subnet)
        alone = model.export()
        with torch.no_grad():
            torch.testing.assert_close(alone(x), model(x), atol=1e-5, rtol=1e-5)
        held = sum(p.numel() for p in alone.prompt_modules.parameters())
        assert held == subnet_params(subnet, g), subnet
    scaled = Subnet({"adapter": (compose(8, "after_attn", True),) * 3})
    plain = Subnet({"adapter": (8, 8, 8)})
    assert subnet_params(scaled, g) - subnet_params(plain, g) == 3 * g.width
    assert added_flops(scaled, g) == added_flops(plain, g)


def test_save_and_load_round_trip(tmp_path):
    _, model = build()
    subnet = Subnet.from_data({"adapter": ["8@parallel+scale", "3@after_attn", 8]})
    model.set_subnet(subnet)
    x = torch.randn(2, 3, 32, 32)
    folder = model.save(tmp_path / "m")
    assert "8@parallel+scale" in (folder / "subnet.yaml").read_text()
    torch.manual_seed(0)
    back = PromptedViT.load(folder, SPEC.create(5)).eval()
    assert back.subnet == subnet
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (
            "{dims: [4], depths: [2], positions: [after_ffn]}",
            "modules.adapter.positions[0]: 'after_ffn' is not one of: after_mlp, after_attn, "
            "parallel",
        ),
        ("{dims: [4], depths: [2], positions: []}", "modules.adapter.positions: expected a non"),
        ("{dims: [4], depths: [2], scaling: [yes, 2]}", "modules.adapter.scaling[1]: 2; expected"),
        (
            "{dims: [4], depth: [2]}",
            "modules.adapter.depth: unknown key; expected one of: dims, depths, max_dim, "
            "options, positions, scaling",
        ),
    ],
)
def test_a_bad_space_is_one_error_naming_the_key(module, message):
    text = small_space_yaml(extra="").replace(
        "  adapter: {dims: [0, 3, 8], depths: [0, 3], max_dim: 8}", f"  adapter: {module}"
    )
    with pytest.raises(ConfigError) as err:
        parse_space(parse_yaml(text))
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"depth": 2, "dims": "8@middle"}, "adapter.dims: '8@middle'; expected a dim"),
        ({"depth": 2, "dims": 8, "scaling": "on"}, "adapter.scaling: 'on'; expected true or"),
        ({"depth": 2, "dims": 8, "position": "top"}, "adapter.position: 'top' is not one of"),
        (
            {"depth": 1, "dims": ["8@parallel"], "position": "after_attn"},
            "either per layer in dims or for all",
        ),
    ],
)
def test_a_bad_choice_is_one_error(data, message):
    with pytest.raises(ConfigError) as err:
        Subnet.from_data({"adapter": data})
    assert message in str(err.value)


def test_options_are_a_frozen_dataclass_recorded_as_a_mapping(tmp_path):
    space, model = build("{dims: [4], depths: [2], options: {dropout: 0.25}}")
    options = space.modules["adapter"].options
    assert (
        options == AdapterOptions(dropout=0.25)
        and model.prompt_modules["adapter"].options == options
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.dropout = 0.5
    assert space.modules["adapter"].to_data()["options"] == {"dropout": 0.25}
    model.set_subnet(Subnet({"adapter": (4, 4)}))
    folder = model.save(tmp_path / "m")
    meta = yaml.safe_load((folder / "subnet.yaml").read_text())
    assert meta["options"]["adapter"] == {"dropout": 0.25}
    torch.manual_seed(0)  # the random backbone build() made
    assert PromptedViT.load(folder, SPEC.create(5)).prompt_modules["adapter"].options == options
    meta["options"]["adapter"]["alpha"] = 2.0  # a key this kind does not have
    (folder / "subnet.yaml").write_text(yaml.safe_dump(meta))
    torch.manual_seed(0)
    backbone = SPEC.create(5)
    with pytest.raises(NasError, match=r"subnet\.yaml: .*unknown option\(s\) \['alpha'\]"):
        PromptedViT.load(folder, backbone)


def test_after_attention_acts_after_what_merges_into_proj():
    """The adapter after the attention reads the branch's output (site ``attn``), after LoRA,
    SSF and bias deltas on ``proj``: merging those leaves the logits unchanged."""
    text = small_space_yaml(
        extra="  lora_proj: {dims: [0, 2], depths: [3]}\n"
        "  ssf: {targets: [none, proj], depths: [3]}\n"
    ).replace("  adapter: {dims: [0, 3, 8], depths: [0, 3], max_dim: 8}", f"  adapter: {PLUS}")
    space = parse_space(parse_yaml(text))
    model = PromptedViT.supernet(space, 5, SPEC.create(5)).eval()
    randomise_modules(model)
    subnet = Subnet(
        {"adapter": (compose(8, "after_attn", True),) * 3, "lora_proj": (2, 2, 2), "ssf": (2,) * 3}
    )
    model.set_subnet(subnet)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        merged = model.export(merge=True)
        assert set(merged.prompt_modules) == {"adapter"}
        torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=1e-5)


def test_budget_moves_and_anchors_treat_equal_sizes_as_one_rung():
    from nas.search.anchors import step

    space, _ = build()
    ladder, g = space.modules["adapter"].ladder(space.geometry), space.geometry
    assert ladder[-1] == space.modules["adapter"].largest(g) == (compose(8, "after_mlp", True),) * 3
    start = Subnet({"adapter": (3, 3, 3)})
    own = subnet_params(start, g)
    rng = random.Random(0)
    sizes = {subnet_params(step(space, start, "adapter", rng), g) for _ in range(200)}
    assert own not in sizes  # a step changes the size, up or down
    assert any(s > own for s in sizes) and any(s < own for s in sizes)


def test_tilted_sampling_ranks_equal_sizes_alike():
    space, _ = build()
    adapter = space.modules["adapter"]
    ranks = dict(zip(adapter.by_size, adapter.size_ranks, strict=True))
    assert len({ranks[compose(8, p)] for p in ("after_mlp", "after_attn", "parallel")}) == 1
    assert ranks[compose(8, "parallel", True)] == ranks[compose(8, "after_mlp", True)] > ranks[8]


def test_a_value_is_one_position_and_a_plain_width():
    _, model = build()
    both = 8 | AFTER_ATTN | PARALLEL
    with pytest.raises(ValueError, match=r"choice \(8@after_attn\|parallel\)x1 exceeds"):
        model.prompt_modules["adapter"].activate((both,))
    with pytest.raises(ConfigError, match="4,294,967,304 is no adapter dim"):
        Subnet.from_data({"adapter": {"depth": 1, "dims": ["4294967304"]}})
    assert Subnet.from_data({"adapter": [3, "8+scale"]}).to_data()["adapter"]["dims"] == [
        3,
        "8+scale",
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"dropout": True}, "option dropout: True; expected a number"),
        ({"dropout": "0.2"}, "option dropout: '0.2'; expected a number"),
        ({"dropout": 1.5}, "option dropout: 1.5 must be below 1"),
        ({"dropout": None}, "option dropout: None; expected a number"),
    ],
)
def test_recorded_options_are_checked_as_the_yaml_is(data, message):
    with pytest.raises(ValueError, match=message):
        AdapterOptions.of(data)
    assert AdapterOptions.of({"dropout": 0}) == AdapterOptions(dropout=0.0)


def test_largest_uniform_reads_composed_dims():
    from benchmarks.recipes import largest_uniform

    space, _ = build()
    assert largest_uniform(space)["adapter"] == (compose(8, "after_mlp", True),) * 3
