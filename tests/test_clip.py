"""CLIP backbones: the generated captioned scenes, the offline CLIP (clip_fmnist) and the
locked-image text tuning that built it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nas.core.errors import NasError
from nas.data import scenes
from nas.families.clip.spec import ClipSpec, TextTower, encode_tokens, load_clip
from nas.families.vit.spec import load_backbone
from tests.conftest import REPO
from trainers.lit import LitConfig, attribute_accuracy, train_lit


def test_scenes_are_reproducible_and_hold_out_their_combinations():
    first = list(scenes.training_pairs(300, seed=5))
    again = list(scenes.training_pairs(300, seed=5))
    assert all(
        np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(first, again, strict=True)
    )
    assert not any(scene.is_held_out() for _, _, scene in first)
    assert all(image.shape == (28, 28) and image.dtype == np.uint8 for image, _, _ in first)
    # Every attribute value of the vocabulary occurs in the training captions.
    words = " ".join(text for _, text, _ in first)
    for values in scenes.ATTRIBUTES.values():
        for value in values:
            assert value in words, value
    held = scenes.held_out_scenes(3, seed=0)
    assert len(held) == 3 * len(scenes.HELD_OUT) and all(s.is_held_out() for s in held)


def test_describe_spells_out_every_attribute():
    scene = scenes.Scene(
        "cross", size="large", fill="hollow", brightness="dim", position="top left"
    )
    assert scenes.describe(scene) == "a large dim hollow cross at the top left"
    assert scenes.describe(scenes.Scene("circle", count="three")) == "three circles"


def small_clip() -> ClipSpec:
    return ClipSpec(image_tower=load_backbone("vit_fmnist"), text=TextTower(16, 32, 2, 2))


def test_trimmed_text_encoding_equals_open_clip_encode_text():
    torch.manual_seed(0)
    spec = small_clip()
    model = spec.create(load=False)
    with torch.no_grad():
        for p in model.parameters():  # away from the init, so that every weight matters
            p.add_(0.02 * torch.randn_like(p))
    ids = spec.tokenizer()(
        ["two crosses.", "a photo of a large dim hollow square at the top left."]
    )
    with torch.no_grad():
        assert torch.allclose(encode_tokens(model, ids), model.encode_text(ids), atol=1e-5)


def test_lit_round_trip_through_the_saved_files(tmp_path):
    cfg = LitConfig(
        context_length=16, width=32, heads=2, layers=2, embed_dim=32, scenes=400,
        fmnist=False, steps=4, batch_size=64, warmup_steps=1, eval_per_combination=4,
        eval_scenes=20,
    )  # fmt: skip
    report = train_lit(cfg, tmp_path / "clip", log=lambda _m: None)
    assert report["loss"][0]["step"] == 0 and len(report["eval"]["held_out"]) == 4
    spec = load_clip(tmp_path / "clip")
    assert spec.text == TextTower(16, 32, 2, 2, 49408) and spec.embed_dim == 32
    loaded = spec.create()
    fresh = spec.create(load=False)
    ids = spec.tokenizer()(["three squares."])
    with torch.no_grad():
        # the saved text tower was trained (differs from the initialisation) and loads in full
        assert not torch.allclose(loaded.encode_text(ids), fresh.encode_text(ids))
        assert float(loaded.logit_scale) == pytest.approx(report["logit_scale"], abs=1e-5)


def test_the_committed_clip_is_zero_shot_above_chance_on_held_out_combinations():
    spec = load_clip("clip_fmnist")
    weights = Path(spec.weights)
    assert weights.stat().st_size <= 20 * 2**20
    model = spec.create()
    tokenizer = spec.tokenizer()
    mean, std = spec.normalisation()
    held = scenes.held_out_scenes(40, seed=1234)  # not the seeds of training or the model card
    rng = np.random.default_rng(1234)
    images = torch.from_numpy(np.stack([scenes.render(s, rng) for s in held])).float() / 255
    x = (images.unsqueeze(1) - mean[0]) / std[0]
    with torch.no_grad():
        feats = model.visual.trunk(x)
    rows_of = {a: [] for a in ("shape", "other")}
    for combination in scenes.HELD_OUT:
        rows = [i for i, s in enumerate(held) if s.matches(combination)]
        result = attribute_accuracy(
            model, tokenizer, feats[rows], [held[i] for i in rows], list(combination)
        )
        for attribute, r in result.items():
            rows_of["shape" if attribute == "shape" else "other"].append(
                (r["accuracy"], r["chance"])
            )
    # Words learnt apart compose: the held-out partner of each shape (a fill, a position, a
    # count that no training caption gave that shape) is recognised far above chance ...
    assert all(acc > chance + 0.2 for acc, chance in rows_of["other"]), rows_of
    # ... and over every held-out attribute, shape included, the mean is well above chance
    # (the shape itself in an unseen combination is the hard part: see the model card).
    everything = rows_of["shape"] + rows_of["other"]
    assert np.mean([a for a, _ in everything]) > np.mean([c for _, c in everything]) + 0.25


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("image_tower: vit_fmnist\nweights: nope.safetensors\n", "weights: file not found"),
        ("image_tower: vit_fmnist\ntemplate: a photo\n", "has no '{}' where the class name goes"),
        ("name: x\n", "give either open_clip_model (with pretrained) or image_tower"),
        ("image_tower: vit_fmnist\ntext: {width: 0}\n", "text.width"),
        ("image_tower: vit_fmnist\nvision: 3\n", "vision"),
    ],
)
def test_bad_clip_yaml_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "clip.yaml"
    path.write_text(text)
    with pytest.raises(NasError) as info:
        load_clip(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_unknown_shipped_clip_lists_the_shipped_ones():
    with pytest.raises(NasError, match="shipped: clip_fmnist"):
        load_clip("clip_nonexistent")


def test_open_clip_weights_without_network_say_how_to_use_a_local_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ClipSpec(open_clip_model="RN50", pretrained="openai")
    with pytest.raises(NasError, match="set pretrained to its local path"):
        spec.create()
    with pytest.raises(NasError, match="open_clip has no model 'ViT-Q-99'"):
        ClipSpec(open_clip_model="ViT-Q-99").create()


def test_shipped_clip_yaml_is_in_the_repository():
    assert (REPO / "backbones" / "clip_fmnist" / "clip.yaml").is_file()


def test_scene_tasks_are_labelled_by_their_attribute(tmp_path):
    from nas.data.lists import read_vtab
    from nas.data.mini_vtab import DEFAULT_TASKS, prepare

    manifest = prepare(tmp_path, ("scenes_fill",), test_size=30, log=lambda *_: None)
    entry = manifest["tasks"]["scenes_fill"]
    assert entry["class_names"] == ["solid shape", "hollow shape", "striped shape"]
    assert entry["group"] == "scenes" and "scenes_fill" not in DEFAULT_TASKS
    splits = read_vtab(tmp_path / "scenes_fill")
    assert splits["train"].class_names == entry["class_names"] and len(splits["train"]) == 800
