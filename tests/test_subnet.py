"""Subnets as plain data: canonical form, round trips, readable printing, exact costs."""

from __future__ import annotations

import json

import pytest

from nas.core.errors import ConfigError, NasError
from nas.space.cost import added_flops, head_params, subnet_params
from nas.space.search_space import load_space
from nas.space.subnet import Subnet
from nas.towers.geometry import TowerGeometry


def test_canonical_form():
    a = Subnet({"vpt": [5, 5, 0, 0], "lora": [], "adapter": (1, 10)})
    b = Subnet({"adapter": [1, 10, 0], "vpt": (5, 5)})
    assert a == b and hash(a) == hash(b) and a.key() == b.key()
    assert list(a) == ["vpt", "adapter"]  # registry order; absent modules are not recorded
    assert a["lora"] == () and "lora" not in a
    assert len({a, b, Subnet({"vpt": [5, 5]})}) == 2
    assert Subnet() == Subnet({"vpt": [0, 0], "lora": None})


def test_round_trips_and_printing():
    s = Subnet({"vpt": [10, 5, 1], "lora": [8] * 12})
    assert str(s) == "vpt=[10,5,1] lora=8x12"
    assert Subnet.from_yaml(s.to_yaml()) == s
    assert Subnet.from_json(s.to_json()) == s
    assert json.loads(s.to_json()) == {
        "vpt": {"depth": 3, "dims": [10, 5, 1]},
        "lora": {"depth": 12, "dims": [8] * 12},
    }
    assert str(Subnet()) == "(no modules)"


def test_readable_yaml_forms():
    s = Subnet.from_yaml("lora: {depth: 12, dims: 8}\nvpt: [4, 0, 4]\nadapter: {depth: 0}\n")
    assert s == Subnet({"lora": [8] * 12, "vpt": [4, 0, 4]})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lora: {depth: 3, dims: [1, 2]}", "lora.dims: has 2 entries but depth is 3"),
        ("lora: {depth: 3}", "lora: missing required key 'dims'"),
        ("lora: {depth: -1, dims: 2}", "lora.depth: -1 is negative"),
        ("prefix: {depth: 1, dims: 1}", "prefix: unknown key; expected one of: vpt, lora, adapter"),
        ("- 1\n- 2", "the document must be a mapping, got a list"),
    ],
)
def test_bad_subnet_data(text, message):
    with pytest.raises(NasError, match=__import__("re").escape(message)):
        Subnet.from_yaml(text)


VIT_B = TowerGeometry(
    width=768,
    depth=12,
    num_heads=12,
    mlp_hidden=3072,
    num_prefix_tokens=1,
    num_patches=196,
    patch_size=16,
    in_chans=3,
)


def test_parameter_counts_match_closed_forms_on_vit_b16():
    d = 768
    p, r, h = [10, 5, 1, 0, 5], [8, 8, 4], [16, 0, 2, 2]
    vpt = sum(x * d for x in p)  # one d-dim token per prompt
    lora = sum(x * d + 3 * d * x for x in r)  # A: r x d, B: 3d x r
    adapter = sum(2 * d * x + x + d for x in h if x)  # down d->h (+h), up h->d (+d)
    s = Subnet({"vpt": p, "lora": r, "adapter": h})
    assert subnet_params(Subnet({"vpt": p}), VIT_B) == vpt == 16_128
    assert subnet_params(Subnet({"lora": r}), VIT_B) == lora == 61_440
    assert subnet_params(Subnet({"adapter": h}), VIT_B) == adapter == 33_044
    assert subnet_params(s, VIT_B) == vpt + lora + adapter
    assert head_params(VIT_B, 100) == 768 * 100 + 100
    # The shipped space's backbone has the same geometry, read off timm's model.
    assert load_space("noah_vtab").geometry == VIT_B


def test_added_flops_closed_form_on_vit_b16():
    n, d, m = 197, 768, 3072

    def block(tokens):
        return (
            2 * tokens * d * 3 * d
            + 4 * tokens * tokens * d
            + 2 * tokens * d * d
            + 4 * tokens * d * m
        )

    # VPT-deep with 10 tokens on all 12 layers: every block runs on 207 tokens.
    assert added_flops(Subnet({"vpt": [10] * 12}), VIT_B) == 12 * (block(207) - block(197))
    # LoRA rank 8 on 12 layers: two thin matmuls per block; nothing once merged.
    lora = Subnet({"lora": [8] * 12})
    assert added_flops(lora, VIT_B) == 12 * 2 * n * (8 * d + 3 * d * 8)
    assert added_flops(lora, VIT_B, merged=True) == 0
    # Adapter width 8 on 12 layers.
    assert added_flops(Subnet({"adapter": [8] * 12}), VIT_B) == 12 * 4 * n * d * 8
    # Shallow VPT: the 5 tokens inserted before block 0 lengthen every block.
    assert added_flops(Subnet({"vpt": [5]}), VIT_B) == 12 * (block(202) - block(197))


def test_subnet_file_errors_name_the_file(tmp_path):
    path = tmp_path / "winner.yaml"
    path.write_text("vpt: {depth: 2, dims: [1]}\n")
    with pytest.raises(
        ConfigError, match=r"winner\.yaml:1: vpt\.dims: has 1 entries but depth is 2"
    ):
        Subnet.load(path)
