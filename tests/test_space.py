"""Search spaces: shipped files, exact counts, normalisation, and one clear error per bad input."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nas.core.errors import ConfigError
from nas.core.yamlio import parse_yaml
from nas.space.cost import subnet_params
from nas.space.search_space import SPACES_DIR, Bounds, load_space, parse_space
from nas.space.subnet import Subnet
from tests.conftest import small_space_yaml

SHIPPED = sorted(SPACES_DIR.glob("*.yaml"))


def test_every_shipped_space_validates():
    names = {p.stem for p in SHIPPED}
    assert {
        "noah_vtab",
        "noah_general",
        "vpt_only",
        "lora_only",
        "adapter_only",
        "tiny_cpu",
    } <= names
    for path in SHIPPED:
        space = load_space(path)
        assert space.count() > 0
        assert space.contains(space.smallest()) and space.contains(space.largest())


def test_noah_vtab_space_counts():
    space = load_space("noah_vtab")
    per_module = sum(3**d for d in (3, 6, 9, 12))
    assert space.count() == per_module**3
    g = space.geometry
    assert (g.width, g.depth, g.seq_len) == (768, 12, 197)
    assert subnet_params(space.largest(), g) == 12 * (
        10 * 768 + 4 * 768 * 10 + 2 * 768 * 10 + 10 + 768
    )
    # The budget is NOAH's 0.64 M; in this space it excludes only the largest few subnets.
    fit = space.count_in_budget()
    assert fit.exact and 0 < space.count() - fit.fitting < 1000


def test_counts_agree_with_enumeration(small_space):
    space = small_space
    every = list(space.subnets())
    assert len(every) == len(set(every)) == space.count()
    assert all(space.contains(s) for s in every)
    g = space.geometry
    costs = [subnet_params(s, g) for s in every]
    for bounds in (
        Bounds(None, 2000),
        Bounds(1500, 4000),
        Bounds(0, 0),
        Bounds(10**9, None),
        Bounds(2000, None),
        Bounds(None, None),
    ):
        assert space.count_within(bounds) == sum(bounds.admits(c) for c in costs)


def test_budget_counts_of_shipped_spaces_are_unchanged():
    """The pruned convolution (largest distribution last, sums over the budget dropped)
    counts what the plain convolution of 4d03c8c counted (24 s each for the ViT-B extended
    spaces then, a fraction of a second now)."""
    counts = {
        "noah_extended_cpu": 594547601809377558999481130,
        "noah_extended_vtab": 937283228788492897944146264315802552079477778306118531,
        "noah_extended_vtab_gps": 647334678057201762631764050392633236857319,
        "noah_vtab": 168086938404671323,
        "tiny_cpu": 65384400954,
    }
    for name, count in counts.items():
        space = load_space(name)
        assert space.count_within(space.budget.params) == count, name


def test_flops_budget_counts_exactly_on_small_spaces():
    space = parse_space(parse_yaml(small_space_yaml(extra="budget: {flops: {max: 400000}}")))
    fit = space.count_in_budget()
    assert fit.exact
    assert fit.fitting == sum(space.budget.admits(s, space.geometry) for s in space.subnets())
    assert 0 < fit.fitting < space.count()


def test_sampling_stays_in_space(small_space):
    rng = random.Random(1)
    for _ in range(200):
        assert small_space.contains(small_space.sample(rng))
        assert small_space.contains(small_space.sample_uniform(rng))
    assert not small_space.contains(Subnet({"lora": [2]}))  # 2 is not a LoRA choice
    assert not small_space.contains(Subnet({"lora": [1, 1, 1, 1, 1]}))  # deeper than allowed
    assert not small_space.contains(Subnet({"lora": [1]}))  # depth 1 is not allowed, no 0 dim
    assert small_space.contains(Subnet({"vpt": [0, 2], "lora": [1, 4]}))  # 0 = skip a layer


def test_candidate_lists_are_normalised():
    text = small_space_yaml().replace(
        "dims: [1, 4], depths: [2, 4]", "dims: [4, 1], depths: [4, 2]"
    )
    space = parse_space(parse_yaml(text))
    assert space.modules["lora"].dims == (1, 4) and space.modules["lora"].depths == (2, 4)


def test_scientific_notation_budget():
    space = parse_space(parse_yaml(small_space_yaml(extra="budget: {params: {max: 3.5e3}}")))
    assert space.budget.params.high == 3500


def test_space_without_max_dim_uses_largest_dim():
    space = parse_space(parse_yaml(small_space_yaml().replace(", max_dim: 6", "")))
    assert space.modules["lora"].max_dim == 4


# Each bad input -> (replacement applied to the small space's YAML, expected message).
BAD = {
    "syntax": ("modules:\n", "modules:\n  vpt: [1, 2\n", r"bad\.yaml:\d+: YAML syntax error"),
    "unknown-module": (
        "  vpt: {",
        "  prompt: {",
        r"modules\.prompt: unknown key; expected one of: vpt, lora, adapter",
    ),
    "unknown-key": (
        "max_dim: 5}",
        "max_dim: 5, width: 3}",
        r"modules\.vpt\.width: unknown key; expected one of: dims, depths, max_dim, options",
    ),
    "negative-dim": (
        "dims: [1, 4]",
        "dims: [1, -4]",
        r"modules\.lora\.dims\[1\]: -4 is negative; expected an integer >= 0",
    ),
    "duplicate-dim": (
        "dims: [1, 4]",
        "dims: [4, 1, 4]",
        r"modules\.lora\.dims\[2\]: 4 is listed twice \(also at \[0\]\)",
    ),
    "dim-above-max": (
        "dims: [0, 3, 8]",
        "dims: [0, 3, 9]",
        r"modules\.adapter\.dims\[2\]: dim 9 is above the supernet maximum max_dim=8",
    ),
    "only-depth-zero": (
        "depths: [0, 3], max_dim: 8",
        "depths: [0], max_dim: 8",
        r"modules\.adapter\.depths: only 0 \(absent\): give at least one positive depth",
    ),
    "depth-above-backbone": (
        "depths: [2, 4], max_dim: 6",
        "depths: [2, 5], max_dim: 6",
        r"modules\.lora\.depths\[1\]: depth 5 is above the backbone's depth \(4 blocks\)",
    ),
    "dim-wider-than-backbone": (  # the small backbone is 48 wide: 3e14 parameters before
        "dims: [1, 4]",
        "dims: [1, 1000000000]",
        r"modules\.lora\.dims\[1\]: dim 1,000,000,000 is above 4 x the backbone's width \(48\)"
        r": expected at most 192",
    ),
    "max-dim-wider-than-backbone": (
        "max_dim: 6",
        "max_dim: 193",
        r"modules\.lora\.max_dim: 193 is above 4 x the backbone's width \(48\)",
    ),
    "string-dims": (
        "dims: [1, 4]",
        "dims: lots",
        r"modules\.lora\.dims: expected a non-empty list of integers, got a string",
    ),
    "float-dim": (
        "dims: [1, 4]",
        "dims: [1, 4.5]",
        r"modules\.lora\.dims\[1\]: expected an integer, got a float \(4\.5\)",
    ),
    "quoted-dim": (
        "dims: [1, 4]",
        "dims: [1, '4']",
        r"modules\.lora\.dims\[1\]: expected an integer, got a string \('4'\)",
    ),
    "bool-depth": (
        "depths: [2, 4], max_dim: 6",
        "depths: [true], max_dim: 6",
        r"modules\.lora\.depths\[0\]: expected an integer, got a boolean",
    ),
    "missing-dims": (
        "lora: {dims: [1, 4], ",
        "lora: {",
        r"modules\.lora: missing required key 'dims'",
    ),
    "missing-modules": ("modules:\n", "mods:\n", r"bad\.yaml:\d+: mods: unknown key"),
    "empty-module": (
        "  lora: {dims: [1, 4], depths: [2, 4], max_dim: 6}\n",
        "  lora:\n",
        r"modules\.lora: expected a mapping, got nothing \(null\)",
    ),
    "unknown-model": (
        "model: vit_tiny_patch16_224",
        "model: vit_nonexistent_9",
        r"backbone\.model: unknown timm model 'vit_nonexistent_9'",
    ),
    "bad-override": ("'depth': 4", "'depth': 'four'", r"backbone\.overrides: timm cannot build"),
    "duplicate-key": (
        "  lora: {",
        "  vpt: {dims: [1]}\n  lora: {",
        r"modules\.vpt: duplicate key \(first given on line \d+\)",
    ),
    "unreachable-budget": (
        "",
        "budget:\n  params: {max: 10}",
        r"budget\.params: no subnet meets this budget \(<= 10\); subnets of this space have [\d,]+ to [\d,]+ trainable parameters",
    ),
    "budget-min-above-max": (
        "",
        "budget:\n  params: {min: 900, max: 10}",
        r"budget\.params: min 900 is above max 10",
    ),
    "negative-budget": (
        "",
        "budget:\n  params: {max: -3}",
        r"budget\.params\.max: -3 is negative; expected a number >= 0",
    ),
    "unreachable-flops": (
        "",
        "budget:\n  flops: {max: 1}",
        r"budget\.flops: no subnet meets this budget",
    ),
    "bad-dropout": (
        "max_dim: 8}",
        "max_dim: 8, options: {dropout: 1.5}}",
        r"modules\.adapter\.options\.dropout: 1\.5 must be below 1",
    ),
    "unknown-option": (
        "max_dim: 8}",
        "max_dim: 8, options: {alpha: 2}}",
        r"modules\.adapter\.options\.alpha: unknown key; expected one of: dropout",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_space_gives_one_clear_error(case, tmp_path: Path):
    old, new, message = BAD[case]
    text = small_space_yaml()
    if old:
        assert old in text, f"test setup: {old!r} not in the YAML"
        text = text.replace(old, new, 1)
    else:
        text += new + "\n"
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_space(path)
    text_of_error = str(info.value)
    assert text_of_error.startswith(str(path)), text_of_error
    assert __import__("re").search(message, text_of_error), text_of_error
    assert "\n" not in text_of_error


def test_error_names_the_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(small_space_yaml().replace("dims: [1, 4]", "dims: [1, -4]"))
    with pytest.raises(ConfigError) as info:
        load_space(path)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "-4" in text)
    assert info.value.line == line


def test_missing_file_and_unknown_shipped_name():
    with pytest.raises(ConfigError, match="file not found"):
        load_space("/nonexistent/space.yaml")
    with pytest.raises(ConfigError, match="no shipped search space of that name"):
        load_space("no_such_space")


def test_space_on_a_named_backbone(tmp_path: Path):
    text = "backbone: {name}\nmodules:\n  lora: {{dims: [1, 2], depths: [2, 6]}}\n"
    path = tmp_path / "s.yaml"
    path.write_text(text.format(name="vit_fmnist"))
    space = load_space(path)
    assert space.backbone.name == "vit_fmnist" and space.geometry.depth == 6
    assert space.backbone.weights.endswith("backbones/vit_fmnist/model.safetensors")
    path.write_text(text.format(name="vit_nowhere"))
    with pytest.raises(
        ConfigError,
        match=r"backbone: 'vit_nowhere': .*no shipped backbone of that name and no such folder \(shipped: clip_fmnist, clip_vitb16_openai, vit_fmnist\)",
    ):
        load_space(path)


def test_a_budget_only_the_empty_subnet_meets_is_refused(tmp_path: Path):
    text = small_space_yaml(extra="budget: {params: {max: 1}}").replace(
        "lora: {dims: [1, 4]", "lora: {dims: [0, 4]"
    )
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"budget\.params: only the empty subnet \(every module "
                       r"off\) meets this budget \(<= 1\): there is nothing to search"):  # fmt: skip
        load_space(path)
