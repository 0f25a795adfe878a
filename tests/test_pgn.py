"""PGN as a prompt module: input-dependent prompts, weight entanglement, exact costs, the same
guarantees as VPT, LoRA and Adapter, and clear errors for bad PGN choices in YAML."""

from __future__ import annotations

import random

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nas.core.errors import ConfigError
from nas.core.yamlio import parse_yaml
from nas.families.vit.model import PromptedViT
from nas.modules.pgn import PGN
from nas.search import ALGORITHMS, Evaluated, make_search
from nas.space.cost import added_flops, subnet_params
from nas.space.search_space import load_space, parse_space
from nas.space.subnet import Subnet
from tests.conftest import REPO, SMALL, small_space_yaml
from tests.test_model import _CountOps
from tests.test_search import OPTIONS
from trainers.optim import build_optimizer, train_step

PGN_YAML = (
    "  pgn: {prompts: [2, 3], library: [4, 8], generators: [resnet10, resnet18], "
    "resolutions: [16, 32]}"
)


@pytest.fixture
def space():
    return parse_space(parse_yaml(small_space_yaml(extra=PGN_YAML)))


def build(space, classes=5, backbone=None):
    model = PromptedViT.supernet(space, classes, backbone).eval()
    with torch.no_grad():
        for name, p in model.prompt_modules.named_parameters():
            if not name.startswith("pgn.generators"):  # keep the generators' own init
                p.normal_(0.0, 0.2)
    return model


def pgn(prompts, library, generator="resnet10", resolution=32, **others):
    return Subnet({**others, "pgn": (prompts, library, generator, resolution)})


def test_prompts_depend_on_the_image(space):
    model = build(space)
    model.set_subnet(pgn(3, 8))
    module = model.prompt_modules["pgn"]
    a, b = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pa, pa_again, pb = module.prompts(a), module.prompts(a.clone()), module.prompts(b)
    assert pa.shape == (2, 3, SMALL["embed_dim"])
    assert torch.equal(pa, pa_again)  # the same image, the same prompts
    assert not torch.allclose(pa[0], pb[0]) and not torch.allclose(pa[0], pa[1])
    # every prompt is a convex mixture of the first M library tokens
    library = module.library[:8]
    mixing = torch.linalg.lstsq(library.T, pa[0].T).solution.T
    assert torch.allclose(mixing.sum(-1), torch.ones(3), atol=1e-4)


def test_supernet_matches_standalone_export_and_save_load(space, tmp_path):
    import copy

    backbone = space.backbone.create(5)
    pretrained = copy.deepcopy(backbone)  # what a user reloads the saved prompts onto
    model = build(space, backbone=backbone)
    x = torch.randn(3, 3, 32, 32)
    model.train()  # batch-norm statistics of the generator move, and must travel with it
    with torch.no_grad():
        for subnet in (pgn(2, 4, "resnet18", 16), pgn(3, 8, vpt=[2, 0, 3], lora=[4, 1])):
            model.set_subnet(subnet)
            model(x)
    model.eval()
    for subnet in (pgn(2, 4, "resnet18", 16), pgn(3, 8, vpt=[2, 0, 3], lora=[4, 1])):
        model.set_subnet(subnet)
        with torch.no_grad():
            expected = model(x)
            standalone = model.export().eval()
            assert torch.allclose(standalone(x), expected, atol=1e-5)
            folder = model.save(tmp_path / str(len(subnet)))
            loaded = PromptedViT.load(folder, copy.deepcopy(pretrained))
            assert torch.allclose(loaded.eval()(x), expected, atol=1e-5)
        # exact parameter count, without building anything
        counted = sum(p.numel() for p in standalone.prompt_modules.parameters())
        assert subnet_params(subnet, space.geometry) == counted


def test_supernet_allocates_its_capacity_exactly(space):
    model = build(space)
    capacity = space.modules["pgn"].capacity()
    counted = sum(p.numel() for p in model.prompt_modules["pgn"].parameters())
    assert PGN.params(capacity, space.geometry) == counted


def test_switching_subnets_allocates_and_copies_nothing(space):
    model = build(space)
    rng = random.Random(0)
    with _CountOps() as counter:
        for _ in range(20):
            model.set_subnet(space.sample(rng))
    assert counter.ops == []


def test_only_pgn_and_head_change_after_a_step(space):
    model = build(space)
    model.set_subnet(pgn(3, 8, "resnet10", 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, 1e-2)
    train_step(model, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), optimizer)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "nothing trained"
    assert all(k.startswith(("prompt_modules.pgn.", "backbone.head.")) for k in changed), changed
    # the active generator, its output layer, the library, and the head all train
    for part in ("generators.resnet10.", "outputs.resnet10.", "library"):
        assert any(f"pgn.{part}" in k for k in changed), part
    assert not any("resnet18" in k for k in changed)  # the other variant's weights are untouched


def test_added_flops_equal_torch_flop_counter(space):
    model = build(space)
    x = torch.randn(1, 3, 32, 32)

    def counted():
        counter = FlopCounterMode(display=False)
        with sdpa_kernel([SDPBackend.MATH]), counter, torch.no_grad():
            model(x)
        return counter.get_total_flops()

    model.set_subnet(Subnet())
    floor = counted()
    for subnet in (pgn(2, 4, "resnet18", 16), pgn(3, 8, "resnet10", 32, vpt=[2], adapter=[3])):
        model.set_subnet(subnet)
        assert counted() - floor == added_flops(subnet, space.geometry), subnet


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_searches_run_unchanged_on_pgn_spaces(space, name):
    algo = make_search(name, space, seed=1, **OPTIONS[name])
    seen = set()
    while batch := algo.ask():
        for s in batch:
            assert space.contains(s) and "pgn" in s and s not in seen, s
            seen.add(s)
        algo.tell([Evaluated(s, random.Random(s.key()).random(), algo.cost(s), 0) for s in batch])
    assert len(seen) == algo.planned


def test_shipped_pgn_spaces():
    for name in ("pgn_cpu", "noah_pgn_cpu"):
        space = load_space(REPO / "search_spaces" / f"{name}.yaml")
        assert "pgn" in space.modules
        model = PromptedViT.supernet(space, 10)
        model.set_subnet(space.largest())
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(
    ("pgn_yaml", "message"),
    [
        (
            "{prompts: [0, 2], library: [4]}",
            r"modules\.pgn\.prompts\[0\]: 0 is too small; expected an integer >= 1",
        ),
        (
            "{prompts: [2], library: [-4]}",
            r"modules\.pgn\.library\[0\]: -4 is too small; expected an integer >= 1",
        ),
        (
            "{prompts: [2], library: [0]}",
            r"modules\.pgn\.library\[0\]: 0 is too small; expected an integer >= 1",
        ),
        (
            "{prompts: [2], library: [4], generators: [resnet50]}",
            r"modules\.pgn\.generators\[0\]: 'resnet50' is not a generator; "
            r"expected one of: resnet10, resnet18",
        ),
        (
            "{prompts: [2], library: [4], resolutions: [0]}",
            r"modules\.pgn\.resolutions\[0\]: 0 is too small; expected an integer >= 1",
        ),
        (
            "{prompts: [2], library: [4], resolutions: [1.5]}",
            r"modules\.pgn\.resolutions\[0\]: expected an integer",
        ),
        ("{prompts: [2]}", r"modules\.pgn: missing required key 'library'"),
        (
            "{prompts: [2, 20], library: [4], placement: border}",
            r"modules\.pgn\.prompts: 20 prompts do not fit on the image's border \(12 patches "
            r"of a 4x4 grid\)",
        ),
        (
            "{prompts: [2], library: [4], placement: corner}",
            r"modules\.pgn\.placement: 'corner' is not a placement; "
            r"expected one of: tokens, border",
        ),
        ("{prompts: [2], library: [4], depth: 3}", r"modules\.pgn\.depth: unknown key"),
    ],
)
def test_bad_pgn_choices(pgn_yaml, message):
    import re

    text = small_space_yaml(extra=f"  pgn: {pgn_yaml}")
    with pytest.raises(ConfigError) as info:
        parse_space(parse_yaml(text, "bad.yaml"))
    assert re.search(message, str(info.value)), str(info.value)
    assert str(info.value).startswith("bad.yaml:")


def test_a_standalone_pgn_model_saves_itself_without_an_export(space, tmp_path, monkeypatch):
    """The exported model of a PGN subnet holds exactly that subnet: saving it writes it as
    it is (it was re-exported, deep-copying the backbone, on every save before)."""
    model = build(space)
    model.set_subnet(pgn(2, 4, "resnet18", 16, lora=[4, 1]))
    standalone = model.export()
    assert standalone._is_standalone() and not model._is_standalone()

    def no_export(*_args, **_kwargs):
        raise AssertionError("a standalone model was exported again")

    monkeypatch.setattr(PromptedViT, "export", no_export)
    folder = standalone.save(tmp_path / "pgn")
    assert PromptedViT.load(folder, check_backbone=False).subnet == standalone.subnet
