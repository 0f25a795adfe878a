"""`nas export`: a LoRA subnet round-trips through PEFT and timm with the same logits; what the
formats cannot express is refused with one message naming it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from peft import PeftModel
from safetensors.torch import save_file

from nas.cli.main import main
from nas.families.vit.model import PromptedViT
from nas.families.vit.spec import BackboneSpec
from nas.space.cost import subnet_params
from nas.space.subnet import Subnet
from tests.conftest import REPO, VARIANTS

NAS = [sys.executable, "-m", "nas"]
LORA = Subnet({"lora": [4, 0, 2, 4]})  # ranks differ per layer, one layer without LoRA
# LoRA on every linear layer of a block, the rank per layer and per target
LORA_ALL = Subnet(
    {"lora": [4, 0, 2, 4], "lora_proj": [2, 2], "lora_fc1": [0, 4, 0, 1], "lora_fc2": [8]}
)
# IA3's targets differ per layer: output scalings (qkv, proj, fc1) and fc2's input
IA3 = Subnet.from_data({"ia3": {"depth": 4, "dims": ["qkv+fc2.in", 0, "all", "fc1"]}})
MERGEABLE = Subnet.from_data(
    {
        "lora": [4, 0, 2, 4],
        "ssf": {"depth": 3, "dims": ["all", "norm1+fc2", 0]},
        "bitfit": {"depth": 4, "dims": ["qkv+proj", 0, 0, "all"]},
        "ia3": {"depth": 2, "dims": ["fc2.in", "qkv"]},
        "lora_fc2": [2],  # reads fc2's input, which IA3 scales: merged before that scaling
    }
)


def saved(
    tmp_path: Path,
    spec: BackboneSpec,
    subnet: Subnet,
    classes: int = 5,
    checkpoint_classes: int | None = None,
    suffix: str = ".safetensors",
) -> PromptedViT:
    """A trained-looking subnet on a backbone whose pretrained weights sit in a file (as the
    shipped backbones do; its head has ``checkpoint_classes``), saved to tmp_path/model;
    returned in eval mode."""
    torch.manual_seed(0)
    backbone = spec.create(checkpoint_classes or classes)
    weights = tmp_path / f"backbone{suffix}"
    state = {k: v.contiguous() for k, v in backbone.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(weights))
    else:
        torch.save(state, weights)
    spec = BackboneSpec(spec.model, spec.overrides, weights=str(weights))
    model = PromptedViT.for_subnet(spec.create(classes), subnet, None, spec)
    with torch.no_grad():  # every module weight and the head away from their initialisation
        for p in model.trainable_parameters():
            p.normal_(0.0, 0.2)
    model.save(tmp_path / "model")
    return model.eval()


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def nas(capsys):
    """`nas ARGS` in this process (its main(), as the console script calls it)."""

    def call(*args: str) -> Result:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return call


def exported_to_peft(tmp_path: Path, nas) -> dict:
    """`nas export tmp_path/model --format peft --out tmp_path/p`, succeeded; its config."""
    result = nas(
        "export", str(tmp_path / "model"), "--format", "peft", "--out", str(tmp_path / "p")
    )
    assert result.returncode == 0, result.stderr
    return json.loads((tmp_path / "p" / "adapter_config.json").read_text())


def test_the_command_line_prints_one_error_line_and_no_traceback(tmp_path):
    saved(tmp_path, VARIANTS["cls-token"], Subnet({"vpt": [2, 0, 0, 0]}))
    result = subprocess.run(
        [*NAS, "export", str(tmp_path / "model"), "--format", "peft", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("nas: error: ") and result.stderr.count("\n") == 1


@pytest.mark.parametrize("variant", ["cls-token", "registers", "deit-distilled"])
def test_a_lora_subnet_round_trips_through_peft_with_equal_logits(tmp_path, variant, nas):
    model = saved(tmp_path, VARIANTS[variant], LORA)
    config = exported_to_peft(tmp_path, nas)
    assert config["rank_pattern"] == {
        "blocks.0.attn.qkv": 4,
        "blocks.2.attn.qkv": 2,
        "blocks.3.attn.qkv": 4,
    }
    assert config["alpha_pattern"] == config["rank_pattern"]  # PEFT's scaling alpha / r = 1
    heads = ["head", "head_dist"] if variant == "deit-distilled" else ["head"]
    assert config["modules_to_save"] == heads

    x = torch.randn(4, 3, 32, 32)
    base = model.backbone_spec.create(5)
    with torch.no_grad():
        plain = base(x)
        peft_model = PeftModel.from_pretrained(base, str(tmp_path / "p")).eval()
        got = peft_model(x)
        want = model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (plain - want).abs().max() > 1e-2  # the adapter and head were loaded, not ignored
    # LoRA sits on exactly the three layers with a rank, at that rank
    ranks = {
        name.removesuffix(".lora_A.default"): m.weight.shape[0]
        for name, m in peft_model.named_modules()
        if name.endswith("lora_A.default")
    }
    assert ranks == {
        f"base_model.model.blocks.{i}.attn.qkv": r for i, r in ((0, 4), (2, 2), (3, 4))
    }


def test_lora_on_every_linear_layer_is_one_peft_adapter_with_equal_logits(tmp_path, nas):
    model = saved(tmp_path, VARIANTS["cls-token"], LORA_ALL)
    config = exported_to_peft(tmp_path, nas)
    want_ranks = {
        **{f"blocks.{i}.attn.qkv": r for i, r in ((0, 4), (2, 2), (3, 4))},
        "blocks.0.attn.proj": 2,
        "blocks.1.attn.proj": 2,
        "blocks.1.mlp.fc1": 4,
        "blocks.3.mlp.fc1": 1,
        "blocks.0.mlp.fc2": 8,
    }
    assert config["rank_pattern"] == want_ranks == config["alpha_pattern"]
    assert config["target_modules"] == sorted(want_ranks) and config["r"] == 8
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        got = PeftModel.from_pretrained(model.backbone_spec.create(5), str(tmp_path / "p"))
        torch.testing.assert_close(got.eval()(x), want, atol=1e-5, rtol=1e-5)
        merged = model.export(merge=True).eval()  # every LoRA folded into its layer
        assert not merged.prompt_modules
        torch.testing.assert_close(merged(x), want, atol=1e-5, rtol=1e-5)
    held = sum(p.numel() for p in model.prompt_modules.parameters())
    assert (
        held
        == subnet_params(LORA_ALL, model.geometry)
        == ((4 + 2 + 4) * (48 + 144) + (2 + 2) * 96 + (4 + 1) * (48 + 192) + 8 * (192 + 48))
    )


@pytest.mark.parametrize("variant", ["cls-token", "registers"])
def test_an_ia3_subnet_round_trips_through_peft_with_equal_logits(tmp_path, variant, nas):
    model = saved(tmp_path, VARIANTS[variant], IA3)
    config = exported_to_peft(tmp_path, nas)
    assert config["peft_type"] == "IA3"
    assert config["target_modules"] == [
        "blocks.0.attn.qkv",
        "blocks.0.mlp.fc2",
        "blocks.2.attn.proj",
        "blocks.2.attn.qkv",
        "blocks.2.mlp.fc1",
        "blocks.2.mlp.fc2",
        "blocks.3.mlp.fc1",
    ]
    assert config["feedforward_modules"] == ["blocks.0.mlp.fc2", "blocks.2.mlp.fc2"]
    x = torch.randn(4, 3, 32, 32)
    base = model.backbone_spec.create(5)
    with torch.no_grad():
        plain = base(x)
        got = PeftModel.from_pretrained(base, str(tmp_path / "p")).eval()(x)
        want = model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (plain - want).abs().max() > 1e-2  # the scalings and head were loaded, not ignored


def test_mergeable_kinds_become_a_timm_checkpoint_but_not_one_peft_adapter(tmp_path, nas):
    model = saved(tmp_path, VARIANTS["cls-token"], MERGEABLE)
    out = tmp_path / "t"
    result = nas("export", str(tmp_path / "model"), "--format", "timm", "--out", str(out))
    assert result.returncode == 0, result.stderr
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)
    result = nas(
        "export", str(tmp_path / "model"), "--format", "peft", "--out", str(tmp_path / "p")
    )
    assert (
        result.returncode == 2
        and "expresses one PEFT method (ia3, lora, lora_fc2)" in result.stderr
    )
    assert "uses ssf ([all,fc2+norm1]), bitfit ([qkv+proj,0,0,all])" in result.stderr
    two = Subnet({k: v for k, v in MERGEABLE.items() if k in ("lora", "ia3")})
    (tmp_path / "two").mkdir()
    saved(tmp_path / "two", VARIANTS["cls-token"], two)
    result = nas("export", str(tmp_path / "two" / "model"), "--format", "peft", "--out", "p")
    assert result.returncode == 2 and "a PEFT adapter holds one method" in result.stderr


def test_biases_merging_made_are_in_the_timm_checkpoint(tmp_path, nas):
    """A backbone built without qkv and MLP biases: bias tuning on qkv and fc1 merges into
    biases it creates, and timm's checkpoint is rebuilt with them (loads strictly)."""
    spec = BackboneSpec("vit_tiny_patch16_224", {**VARIANTS["cls-token"].overrides,
                        "qkv_bias": False, "proj_bias": False})  # fmt: skip
    model = saved(tmp_path, spec, Subnet.from_data({"bitfit": [1, 4]}))  # qkv, then fc1
    out = tmp_path / "t"
    assert (
        nas("export", str(tmp_path / "model"), "--format", "timm", "--out", str(out)).returncode
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"]["qkv_bias"] is True and config["model_args"]["proj_bias"] is True
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)


def test_a_lora_subnet_becomes_a_timm_checkpoint_with_equal_logits(tmp_path, nas):
    model = saved(tmp_path, VARIANTS["cls-token"], LORA)
    out = tmp_path / "t"
    result = nas("export", str(tmp_path / "model"), "--format", "timm", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(out / "config.json"), str(out / "model.safetensors")]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        folder = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        checkpoint = timm.create_model(
            model.backbone_spec.model,
            checkpoint_path=str(out / "model.safetensors"),
            num_classes=5,
            **model.backbone_spec.overrides,
        ).eval()
        torch.testing.assert_close(folder(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(checkpoint(x), want, atol=1e-5, rtol=1e-5)
    # timm's own config records the architecture and the inputs the model was trained with
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["model_args"]["depth"] == 4 and config["num_classes"] == 5
    mean, std = model.backbone_spec.normalisation()
    assert config["pretrained_cfg"]["mean"] == list(mean)
    assert config["pretrained_cfg"]["std"] == list(std)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_the_peft_readme_runs_as_printed_with_another_class_count(tmp_path, nas, suffix):
    """The README's code, executed as written (from the folder above the export): the base
    gets the task's 5 classes and the backbone's weights from a checkpoint whose head has
    1,000; the adapter and head load onto it and give the saved model's logits."""
    import re

    model = saved(tmp_path, VARIANTS["cls-token"], LORA, checkpoint_classes=1000, suffix=suffix)
    out = tmp_path / "adapter"
    result = nas("export", str(tmp_path / "model"), "--format", "peft", "--out", str(out))
    assert result.returncode == 0, result.stderr
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    compile(code, "README.md", "exec")  # it parses as printed
    import os

    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        scope: dict = {}
        exec(code, scope)
    finally:
        os.chdir(here)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scope["model"](x), model(x), atol=1e-5, rtol=1e-5)
    # the backbone's pretrained weights were loaded (not left at timm's initialisation)
    backbone = model.backbone.state_dict()
    compared = 0
    for key, value in scope["base"].state_dict().items():
        if key.startswith("blocks.1.") and key in backbone:
            torch.testing.assert_close(value, backbone[key])
            compared += 1
    assert compared >= 8


def test_a_timm_export_describes_its_own_weights_not_timms_stock_ones(tmp_path, nas):
    model = saved(tmp_path, VARIANTS["cls-token"], LORA)
    out = tmp_path / "t"
    assert (
        nas("export", str(tmp_path / "model"), "--format", "timm", "--out", str(out)).returncode
        == 0
    )
    cfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    stock = timm.create_model("vit_tiny_patch16_224", pretrained=False).pretrained_cfg
    assert stock["tag"] == "augreg_in21k_ft_in1k" and "license" in stock
    assert cfg["tag"] != stock["tag"] and "license" not in cfg
    assert str(model.subnet) in cfg["description"] and "backbone.safetensors" in cfg["description"]
    assert not {"hf_hub_id", "url", "paper_ids"} & set(cfg)


def test_a_head_only_subnet_goes_to_timm_not_peft(tmp_path, nas):
    model = saved(tmp_path, VARIANTS["cls-token"], Subnet())
    result = nas(
        "export", str(tmp_path / "model"), "--format", "peft", "--out", str(tmp_path / "p")
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "has no module that PEFT expresses" in result.stderr
    assert "--format timm" in result.stderr
    assert not (tmp_path / "p").exists()  # refused before anything was written
    result = nas(
        "export", str(tmp_path / "model"), "--format", "timm", "--out", str(tmp_path / "t")
    )
    assert result.returncode == 0, result.stderr
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        loaded = timm.create_model(f"local-dir:{tmp_path / 't'}", pretrained=True).eval()
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["peft", "timm"])
def test_modules_a_format_cannot_express_are_named(tmp_path, fmt, nas):
    subnet = Subnet({"vpt": [2, 2, 0, 0], "lora": [4, 4, 4, 4], "adapter": [0, 8, 8, 8]})
    saved(tmp_path, VARIANTS["cls-token"], subnet)
    result = nas("export", str(tmp_path / "model"), "--format", fmt, "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    can = {"peft": "one PEFT method (lora)", "timm": "the modules that merge into the frozen "
           "weights (lora)"}[fmt]  # fmt: skip
    # (the model holds the subnet's kinds only: the ones that could be exported are named)
    assert f"--format {fmt} expresses {can} and the head only" in lines[0]
    assert "uses vpt (2x2), adapter ([0,8,8,8])" in lines[0]
    assert not (tmp_path / "o").exists()


def test_bad_export_arguments_get_one_line(tmp_path, nas):
    saved(tmp_path, VARIANTS["cls-token"], LORA)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "file").write_text("x")
    cases = {
        (str(tmp_path / "nowhere"), str(tmp_path / "o")): "subnet.yaml: missing",
        (str(tmp_path / "model"), str(tmp_path / "full")): "not empty (--force writes into it)",
        (str(tmp_path / "model"), str(tmp_path / "file")): "a file, not a folder",
    }
    for (model, out), message in cases.items():
        result = nas("export", model, "--format", "peft", "--out", out)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert message in result.stderr, result.stderr
    result = nas(
        "export",
        str(tmp_path / "model"),
        "--format",
        "peft",
        "--out",
        str(tmp_path / "full"),
        "--force",
    )
    assert result.returncode == 0, result.stderr
    result = nas(
        "export", str(tmp_path / "model"), "--format", "onnx", "--out", str(tmp_path / "o")
    )
    assert result.returncode == 2 and "invalid choice: 'onnx'" in result.stderr
