"""CLIP with prompt modules: CoOp (upt, text mode), UPT (unified), and the ViT modules on the
image tower; exactness against open_clip itself, weight entanglement, exact costs, YAML errors.
A small CLIP with a random text tower on the committed vit_fmnist image tower keeps it fast."""

from __future__ import annotations

import random
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from nas import families
from nas.core.errors import ConfigError, NasError
from nas.core.yamlio import parse_yaml
from nas.families.clip.model import PromptedCLIP
from nas.modules.upt import UPT
from nas.modules.upt_kind import encoder_layer_params
from nas.space.cost import subnet_params
from nas.space.search_space import parse_space
from nas.space.subnet import Subnet
from trainers.optim import build_optimizer, train_step

# Its module-scoped fixtures run once: under pytest-xdist every test here goes to one worker.
pytestmark = pytest.mark.xdist_group("upt")

NAMES = ["circle", "square", "triangle", "cross"]
CLIP_YAML = (
    "image_tower: vit_fmnist\nembed_dim: 32\n"
    "text: {context_length: 24, width: 32, heads: 2, layers: 2}\n"
)


def space_yaml(clip_path, modules: str) -> str:
    return f"name: clip-test\nbackbone: {{clip: {clip_path}}}\nmodules:\n{modules}"


MODULES = (
    "  upt: {modes: [none, text, unified], n_ctx: [2, 4], options: {init: a photo of a}}\n"
    "  vpt: {dims: [0, 2], depths: [1, 3]}\n"
    "  lora: {dims: [0, 2], depths: [6]}\n"
    "  adapter: {dims: [0, 2], depths: [3, 6]}\n"
)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip.yaml"
    path.write_text(CLIP_YAML)
    return path


@pytest.fixture(scope="module")
def space(clip_path):
    return parse_space(parse_yaml(space_yaml(clip_path, MODULES)))


def fresh_clip(space, seed=0):
    torch.manual_seed(seed)
    clip = space.backbone.create(load=False)
    with torch.no_grad():  # a random but not degenerate text tower and projections
        for name, p in clip.named_parameters():
            if not name.startswith("visual.trunk."):
                p.add_(0.05 * torch.randn_like(p))
    return clip


def build(space, seed=0):
    model = PromptedCLIP.supernet(space, NAMES, fresh_clip(space, seed)).eval()
    with torch.no_grad():
        for p in model.prompt_modules.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def images(n=3, seed=1):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_zero_shot_equals_open_clip_with_the_template(space):
    model = build(space)
    model.set_subnet(Subnet())  # no context, no image modules: plain CLIP
    x = images()
    clip = model.clip
    model.tower.detach()  # open_clip's own forward, without our hooks
    try:
        with torch.no_grad():
            ids = model.prompts.tokenizer([f"a photo of a {n}." for n in NAMES])
            img = F.normalize(clip.encode_image(x), dim=-1)
            txt = F.normalize(clip.encode_text(ids), dim=-1)
            expected = clip.logit_scale.exp() * img @ txt.T
    finally:
        model.tower.attach()
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_unified_text_path_is_coop_and_coop_leaves_the_image_tower_as_it_was(space):
    model = build(space)
    upt = model.prompt_modules["upt"]
    x = images()
    with torch.no_grad():
        model.set_subnet(Subnet({"upt": ("unified", 4)}))
        unified_text = model.text_features()
        context = upt.text_context()
        upt.ctx[:4].copy_(context)  # CoOp given UPT's text context vectors
        model.set_subnet(Subnet({"upt": ("text", 4)}))
        assert torch.allclose(model.text_features(), unified_text, atol=1e-6)
        # text mode: the image features are the frozen tower's own
        model.tower.detach()
        frozen = F.normalize(model.clip.encode_image(x), dim=-1)
        model.tower.attach()
        assert torch.allclose(model.image_features(x), frozen, atol=1e-6)
        # unified mode: its visual prompts change them
        model.set_subnet(Subnet({"upt": ("unified", 4)}))
        model.text_features()
        assert not torch.allclose(model.image_features(x), frozen, atol=1e-3)


def test_context_starts_from_the_init_phrase(space):
    torch.manual_seed(0)
    model = PromptedCLIP.supernet(space, NAMES, space.backbone.create(load=False))
    ids = model.prompts.tokenizer(["a photo of a"])[0][1:5]
    phrase = model.clip.token_embedding(ids)
    upt = model.prompt_modules["upt"]
    assert torch.equal(upt.ctx[:4], phrase) and torch.equal(upt.u_text[:4], phrase)


def test_random_init_keeps_the_context_random(clip_path):
    text = MODULES.replace("options: {init: a photo of a}", "options: {init: random}")
    space = parse_space(parse_yaml(space_yaml(clip_path, text)))
    torch.manual_seed(0)
    model = PromptedCLIP.supernet(space, NAMES, space.backbone.create(load=False))
    ids = model.prompts.tokenizer(["a photo of a"])[0][1:5]
    phrase = model.clip.token_embedding(ids)
    upt = model.prompt_modules["upt"]
    assert not torch.allclose(upt.ctx[:4], phrase) and float(upt.ctx.detach().std()) < 0.05


def test_only_prompt_weights_change_after_a_step(space):
    model = build(space)
    model.set_subnet(Subnet({"upt": ("unified", 4), "vpt": (2, 2, 2), "lora": (2,) * 6}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.0)
    model.train()
    train_step(model, images(8), torch.arange(8) % len(NAMES), opt)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("prompt_modules.") for k in changed)
    assert any(k.startswith("prompt_modules.upt.encoder") for k in changed)
    assert not any(k.startswith("prompt_modules.upt.ctx") for k in changed)  # text mode unused


def test_state_dict_holds_each_frozen_weight_once(space):
    model = build(space)
    state = model.state_dict()
    assert not any(k.startswith("backbone.") for k in state)
    assert len({t.data_ptr() for t in state.values()}) == len(state)
    trunk = {f"clip.visual.trunk.{k}" for k in model.backbone.state_dict()}
    assert trunk and trunk <= state.keys()


@pytest.mark.parametrize("seed", range(4))
def test_standalone_export_matches_the_supernet(space, seed):
    model = build(space)
    rng = random.Random(seed)
    x = images()
    for _ in range(3):
        subnet = space.sample(rng)
        model.set_subnet(subnet)
        alone = model.export()
        with torch.no_grad():
            assert torch.allclose(model(x), alone(x), atol=1e-5), subnet
        # allocated at exactly the subnet's size: the exact count without building
        counted = sum(p.numel() for p in alone.prompt_modules.parameters())
        assert counted == subnet_params(subnet, space.geometry) == alone.num_params()["total"]


def test_upt_parameter_counts_are_exact(space):
    g = space.geometry
    d, v = g.text_width, g.width
    assert UPT.params(("text", 4), g) == 4 * d
    assert UPT.params(("unified", 2), g) == 4 * d + encoder_layer_params(d) + d * v + v
    layer = UPT(g, ("unified", 2), {}).encoder
    assert sum(p.numel() for p in layer.parameters()) == encoder_layer_params(d)
    upt_space = space.modules["upt"]
    assert upt_space.count() == 5 and () in set(upt_space.choices())
    assert UPT.extra_tokens(("unified", 4), g) == [4] * g.depth
    assert UPT.extra_tokens(("text", 4), g) == [0] * g.depth


def test_the_visual_prompts_join_the_sequence(space):
    model = build(space)
    model.set_subnet(Subnet({"upt": ("unified", 2), "vpt": (2,)}))
    seen = []
    block = model.backbone.blocks[0]
    handle = block.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        model(images(2))
    handle.remove()
    assert seen == [space.geometry.seq_len + 2 + 2]


def test_a_class_name_too_long_for_the_context_is_a_clear_error(space):
    model = build(space)
    name = " ".join(["big"] * 15 + ["circle"])  # 16 tokens: fits the template, not 8 vectors
    long = PromptedCLIP(model.clip, space.backbone, [name], {})
    with pytest.raises(NasError, match=r"with '8 context vectors' does not fit the text tower's"):
        long.prompts.with_context(8)
    with pytest.raises(NasError, match=re.escape("with 'a photo of a {}.' does not fit")):
        PromptedCLIP(model.clip, space.backbone, ["big " * 20 + "circle"], {})


@pytest.mark.parametrize(
    ("modules", "key", "message"),
    [
        ("  upt: {modes: [text], n_ctx: [0]}\n", "modules.upt.n_ctx[0]", ">= 1"),
        ("  upt: {modes: [txt], n_ctx: [2]}\n", "modules.upt.modes[0]", "'txt' is not a mode"),
        ("  upt: {modes: [none], n_ctx: [2]}\n", "modules.upt.modes", "only 'none'"),
        ("  upt: {modes: [text], n_ctx: [20]}\n", "modules.upt.n_ctx", "use at most 16"),
        ("  upt: {modes: text, n_ctx: [2]}\n", "modules.upt.modes", "expected a list"),
        ("  upt: {modes: [text]}\n", "modules.upt", "n_ctx"),
    ],
)
def test_bad_upt_yaml(clip_path, modules, key, message):
    with pytest.raises(ConfigError) as info:
        parse_space(parse_yaml(space_yaml(clip_path, modules)))
    assert info.value.key == key and message in str(info.value)


def test_upt_on_a_plain_vit_is_refused():
    text = "name: x\nbackbone: vit_fmnist\nmodules:\n  upt: {modes: [text], n_ctx: [2]}\n"
    with pytest.raises(ConfigError, match="has none") as info:
        parse_space(parse_yaml(text))
    assert info.value.key == "modules.upt"


def test_supernet_training_steps_over_draws_with_nothing_to_train(space):
    """On a CLIP the empty subnet (zero-shot: no context, no image modules) has no trainable
    weight and no head: a supernet batch that draws it is a zero update, not an error."""
    from nas.data.decode import DecodedSplit
    from nas.training.train import TrainConfig, train

    model = build(space)
    g = torch.Generator().manual_seed(0)
    data = DecodedSplit(
        "train",
        torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8, generator=g),
        torch.arange(32) % len(NAMES),
        len(NAMES),
        NAMES,
        "random",
    )
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-2, weight_decay=0.1, warmup_epochs=0)
    before = {k: v.clone() for k, v in model.prompt_modules.state_dict().items()}
    train(model, data, cfg, mean=(0.5,), std=(0.5,), sample_subnet=lambda rng: Subnet())
    after = model.prompt_modules.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # not even weight decay
    draws = iter([Subnet(), Subnet({"lora": (2,) * 6}), Subnet(), Subnet({"upt": ("text", 2)})])
    train(model, data, cfg, mean=(0.5,), std=(0.5,), sample_subnet=lambda rng: next(draws))
    after = model.prompt_modules.state_dict()
    assert not torch.equal(before["lora.layers.0.A"], after["lora.layers.0.A"])


def test_a_saved_clip_subnet_loads_back_and_refuses_what_does_not_fit(space, tmp_path):
    """Save writes the standalone subnet; ``PromptedCLIP.load`` (and the generic
    ``nas.families.load``'s dispatch by format) gives the same logits on the same CLIP; other
    frozen weights, a damaged tensor or a ViT folder are each one clear error."""
    model = build(space)
    subnet = Subnet({"upt": ("unified", 4), "vpt": [2], "lora": [2] * 6})
    model.set_subnet(subnet)
    folder = model.save(tmp_path / "winner")
    loaded = PromptedCLIP.load(folder, fresh_clip(space)).eval()
    assert type(loaded) is PromptedCLIP and loaded.subnet == subnet
    assert loaded.class_names == NAMES
    with torch.no_grad():
        torch.testing.assert_close(loaded(images()), model(images()))
    with pytest.raises(NasError, match="sha256 mismatch"):
        PromptedCLIP.load(folder, fresh_clip(space, seed=1))
    assert PromptedCLIP.load(folder, fresh_clip(space, seed=1), check_backbone=False)
    weights = folder / "weights.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(weights))
    with pytest.raises(NasError, match=re.escape(f"{name} holds NaN")):
        PromptedCLIP.load(folder, fresh_clip(space))
    vit = families.FAMILIES["vit"].model_class()
    with pytest.raises(NasError, match=r"format: 'nas-prompt-clip-subnet/1' is not"):
        vit.load(folder)
