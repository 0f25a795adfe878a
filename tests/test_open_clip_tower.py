"""open_clip's own image tower (the OpenAI/LAION CLIPs' nn.MultiheadAttention blocks) through
the per-block injection interface: the same modules as on timm towers, exact against open_clip.
A tiny open_clip architecture registered from a JSON config stands in for ViT-B/16 (same code
path as `open_clip_model: ViT-B-16`, random weights, nothing downloaded)."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from nas.core.yamlio import parse_yaml
from nas.families.clip.model import PromptedCLIP
from nas.modules.adapter_kind import compose
from nas.space.cost import subnet_params
from nas.space.search_space import parse_space
from nas.space.subnet import Subnet
from nas.towers.adapters import OpenClipViTTower

# Its module-scoped fixtures run once: under pytest-xdist every test here goes to one worker.
pytestmark = pytest.mark.xdist_group("open_clip_tower")

NAMES = ["cat", "dog", "car"]
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    import open_clip

    folder = tmp_path_factory.mktemp("oc")
    (folder / "nas-tiny-vit.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(folder / "nas-tiny-vit.json")
    (folder / "clip.yaml").write_text("open_clip_model: nas-tiny-vit\n")
    text = (
        f"name: oc\nbackbone: {{clip: {folder / 'clip.yaml'}}}\nmodules:\n"
        "  vpt: {dims: [0, 2, 4], depths: [1, 3]}\n"
        "  lora: {dims: [0, 2], depths: [3]}\n"
        "  adapter: {dims: [0, 4], depths: [3], positions: [after_mlp, after_attn, parallel],"
        " scaling: [false, true]}\n"
        "  upt: {modes: [none, text, unified], n_ctx: [2, 4]}\n"
        "  ssf: {targets: [none, all, qkv+fc1], depths: [3]}\n"
        "  bitfit: {targets: [none, all], depths: [3]}\n"
        "  ia3: {targets: [none, all], depths: [3]}\n"
        "  lora_proj: {dims: [0, 2], depths: [3]}\n"
        "  lora_fc1: {dims: [0, 2], depths: [3]}\n"
        "  lora_fc2: {dims: [0, 2], depths: [3]}\n"
    )
    return parse_space(parse_yaml(text))


@pytest.fixture(scope="module")
def spec(space):
    return space.backbone


def build(spec, space, seed=0):
    torch.manual_seed(seed)
    model = PromptedCLIP.supernet(space, NAMES, spec.create()).eval()
    with torch.no_grad():
        for p in model.prompt_modules.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_geometry_is_read_off_the_open_clip_model(spec):
    g = spec.geometry()
    assert (g.width, g.depth, g.num_heads, g.mlp_hidden) == (64, 3, 2, 256)
    assert (g.num_patches, g.patch_size, g.in_chans, g.seq_len) == (16, 8, 3, 17)
    assert (g.text_width, g.text_context) == (32, 24)


def test_the_adapter_alone_reproduces_open_clip(spec, space):
    model = build(spec, space)
    model.set_subnet(Subnet())
    x = torch.randn(2, 3, 32, 32)
    assert isinstance(model.tower, OpenClipViTTower)
    with torch.no_grad():
        ours = model.tower.forward(x)
        model.tower.detach()
        theirs = model.clip.visual(x)
        model.tower.attach()
        assert torch.allclose(ours, theirs, atol=1e-5)
        ids = model.prompts.tokenizer([f"a photo of a {n}." for n in NAMES])
        expected = (
            model.clip.logit_scale.exp()
            * F.normalize(theirs, dim=-1)
            @ F.normalize(model.clip.encode_text(ids), dim=-1).T
        )
        assert torch.allclose(model(x), expected, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_export_matches_the_supernet_and_mergeable_kinds_merge(spec, space, seed):
    model = build(spec, space)
    rng = random.Random(seed)
    x = torch.randn(2, 3, 32, 32)
    for _ in range(3):
        subnet = space.sample(rng)
        model.set_subnet(subnet)
        alone = model.export()
        merged = model.export(merge=True)
        with torch.no_grad():
            assert torch.allclose(model(x), alone(x), atol=1e-5), subnet
            assert torch.allclose(model(x), merged(x), atol=1e-4), subnet
        counted = sum(p.numel() for p in alone.prompt_modules.parameters())
        assert counted == subnet_params(subnet, space.geometry)


def test_every_site_changes_the_output(spec, space):
    model = build(spec, space)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.set_subnet(Subnet())
        plain = model(x)
        for subnet in (
            {"vpt": (2,)},
            {"lora": (2, 2, 2)},
            {"adapter": (4, 4, 4)},
            *({"adapter": (compose(4, p, True),) * 3} for p in ("after_attn", "parallel")),
            {"upt": ("unified", 2)},
            {"upt": ("text", 2)},
            *({"ssf": (1 << i,)} for i in range(6)),  # after each of its six operations
            *({"bitfit": (1 << i,) * 3} for i in range(6)),
            *({"ia3": (1 << i,) * 3} for i in range(4)),  # qkv, proj, fc1, fc2's input
            *({kind: (2, 2, 2)} for kind in ("lora_proj", "lora_fc1", "lora_fc2")),
        ):
            model.set_subnet(Subnet(subnet))
            assert not torch.allclose(model(x), plain, atol=1e-4), subnet


def test_a_local_open_clip_checkpoint_is_loaded(spec, tmp_path):
    """`pretrained: FILE` (relative to the CLIP yaml) loads those weights, as a user with a
    downloaded OpenAI/LAION checkpoint would; a file that is not a checkpoint is one clear
    error naming it."""
    from safetensors.torch import save_file

    from nas.core.errors import NasError
    from nas.families.clip.spec import load_clip

    torch.manual_seed(3)
    source = spec.create()
    weights = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(weights, tmp_path / "tiny.safetensors")
    (tmp_path / "clip.yaml").write_text(
        "open_clip_model: nas-tiny-vit\npretrained: tiny.safetensors\n"
    )
    loaded = load_clip(tmp_path / "clip.yaml").create()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, weights[name]), name

    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    (tmp_path / "clip.yaml").write_text(
        "open_clip_model: nas-tiny-vit\npretrained: broken.safetensors\n"
    )
    message = r"broken\.safetensors: could not load it as open_clip 'nas-tiny-vit' weights"
    with pytest.raises(NasError, match=message):
        load_clip(tmp_path / "clip.yaml").create()
