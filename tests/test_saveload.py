"""Saving a subnet's trainable weights as safetensors beside its YAML, and loading them back."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nas.core.errors import NasError
from nas.core.paths import SUBNET_FILE, WEIGHTS_FILE
from nas.families.vit.model import PromptedViT
from nas.space.subnet import Subnet
from tests.conftest import VARIANTS, randomise_modules, space_for

SUBNET = Subnet({"vpt": [2, 0, 3], "lora": [4, 1], "adapter": [8, 0, 3]})


@pytest.fixture
def trained(tmp_path):
    spec = VARIANTS["cls-token"]
    backbone = spec.create(5)
    pretrained = copy.deepcopy(backbone)  # stands for the pretrained weights a user reloads
    model = PromptedViT.supernet(space_for(spec), 5, backbone).eval()
    randomise_modules(model)
    with torch.no_grad():
        model.backbone.head.weight.normal_()
    model.set_subnet(SUBNET)
    return model, pretrained, model.save(tmp_path / "winner")


def test_round_trip_gives_the_same_logits(trained):
    model, pretrained, folder = trained
    x = torch.randn(2, 3, 32, 32)
    loaded = PromptedViT.load(folder, copy.deepcopy(pretrained)).eval()
    assert loaded.subnet == SUBNET
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
        merged = PromptedViT.load(folder, copy.deepcopy(pretrained), merge=True).eval()
        assert torch.allclose(merged(x), model(x), atol=1e-5)
    # Built from the recorded architecture alone, it still knows the subnet and sizes.
    rebuilt = PromptedViT.load(folder, check_backbone=False)
    assert rebuilt.subnet == SUBNET


def test_only_trained_weights_are_written(trained):
    model, _, folder = trained
    tensors = load_file(str(folder / WEIGHTS_FILE))
    assert all(k.startswith(("prompt_modules.", "backbone.head.")) for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == model.num_params()["total"]
    meta = yaml.safe_load((folder / SUBNET_FILE).read_text())
    assert Subnet.from_data(meta["subnet"]) == SUBNET
    assert meta["trainable_params"]["modules"] == model.num_params()["modules"]
    assert meta["num_classes"] == 5


def test_wrong_backbone_is_refused(trained):
    _, _, folder = trained
    other = VARIANTS["cls-token"].create(5)  # same architecture, other weights
    with pytest.raises(NasError, match="differ from the ones these prompt weights were trained on"):
        PromptedViT.load(folder, other)


def test_bad_checkpoints_give_clear_errors(trained, tmp_path):
    _, pretrained, folder = trained
    (folder / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(NasError, match="not a readable safetensors file"):
        PromptedViT.load(folder, copy.deepcopy(pretrained))

    with pytest.raises(NasError, match=r"subnet\.yaml: missing"):
        PromptedViT.load(tmp_path / "empty", copy.deepcopy(pretrained))


def test_weights_of_another_subnet_are_refused(trained):
    _, pretrained, folder = trained
    meta = yaml.safe_load((folder / SUBNET_FILE).read_text())
    meta["subnet"]["lora"] = {"depth": 2, "dims": [1, 1]}
    (folder / SUBNET_FILE).write_text(yaml.safe_dump(meta))
    with pytest.raises(NasError, match=r"lora\.layers\.0\.A has shape \(4, 48\)"):
        PromptedViT.load(folder, copy.deepcopy(pretrained))


def test_saved_record_of_a_pretrained_backbone_rebuilds_it(tmp_path):
    """A subnet trained on a backbone with weights records them; loading without a backbone
    rebuilds the same pretrained one from that record."""
    from nas.families.vit.spec import load_backbone

    spec = load_backbone("vit_fmnist")
    model = PromptedViT.for_subnet(spec.create(4), Subnet({"lora": [2, 2]}), backbone_spec=spec)
    folder = model.save(tmp_path / "m")
    loaded = PromptedViT.load(folder)  # backbone built from the record, hash checked
    assert loaded.backbone_spec == spec


def test_full_finetune_saves_and_reloads_every_weight(tmp_path):
    spec = VARIANTS["cls-token"]
    model = PromptedViT.for_subnet(spec.create(5), Subnet(), full_finetune=True).eval()
    backbone_params = sum(p.numel() for p in model.backbone.parameters())
    head = model.num_params()["head"]
    assert model.num_params()["modules"] == backbone_params - head
    assert sum(p.numel() for p in model.trainable_parameters()) == backbone_params
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))  # "fine-tuned"
    folder = model.save(tmp_path / "full")
    assert len(load_file(str(folder / WEIGHTS_FILE))) == len(list(model.backbone.parameters()))
    # Onto a backbone with other (pretrained) weights: every weight comes from the file.
    loaded = PromptedViT.load(folder, spec.create(5)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.full_finetune


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (  # a module on layers the backbone does not have
            lambda m: m["subnet"].update({"lora": {"depth": 9, "dims": 4}}),
            r"subnet\.yaml: subnet .* cannot be built on this backbone|does not match subnet",
        ),
        (  # an architecture timm cannot build
            lambda m: m["backbone"]["overrides"].update({"embed_dim": -3}),
            r"subnet\.yaml: its backbone \(vit_tiny_patch16_224, overrides .*\) cannot be built",
        ),
        (
            lambda m: m["backbone"].update({"mean": "grey"}),
            r"subnet\.yaml:\d+: backbone\.mean: expected a list of numbers, got 'grey'",
        ),
        (
            lambda m: m.update({"options": ["dropout"]}),
            r"subnet\.yaml:\d+: options: expected a mapping",
        ),
    ],
)
def test_an_edited_subnet_yaml_is_one_clear_error(trained, edit, message):
    _, _, folder = trained
    meta = yaml.safe_load((folder / SUBNET_FILE).read_text())
    edit(meta)
    (folder / SUBNET_FILE).write_text(yaml.safe_dump(meta))
    with pytest.raises(NasError, match=message):
        PromptedViT.load(folder, check_backbone=False)


def test_weights_holding_nan_are_refused(trained):
    from safetensors.torch import save_file

    _, pretrained, folder = trained
    tensors = load_file(str(folder / WEIGHTS_FILE))
    name = sorted(tensors)[0]
    tensors[name][0] = float("nan")
    save_file(tensors, str(folder / WEIGHTS_FILE))
    with pytest.raises(NasError, match=rf"{name} holds NaN or infinite values"):
        PromptedViT.load(folder, copy.deepcopy(pretrained))


def test_a_saved_model_loads_after_the_checkout_moved(tmp_path):
    """The record of a shipped backbone names its weights file in the checkout that saved it;
    moved elsewhere, the shipped backbone of this checkout is found by name (and the sha256
    check proves it is the same). Any other missing weights file is one clear error."""
    from nas.families.vit.spec import load_backbone

    spec = load_backbone("vit_fmnist")
    model = PromptedViT.for_subnet(spec.create(4), Subnet({"lora": [2, 2]}), backbone_spec=spec)
    folder = model.save(tmp_path / "m")
    meta = yaml.safe_load((folder / SUBNET_FILE).read_text())
    meta["backbone"]["weights"] = "/old/checkout/backbones/vit_fmnist/model.safetensors"
    (folder / SUBNET_FILE).write_text(yaml.safe_dump(meta))
    assert PromptedViT.load(folder).subnet == Subnet({"lora": [2, 2]})
    meta["backbone"]["name"] = "my_vit"
    (folder / SUBNET_FILE).write_text(yaml.safe_dump(meta))
    with pytest.raises(NasError, match=r"the backbone weights it records \(/old/checkout/"):
        PromptedViT.load(folder)
