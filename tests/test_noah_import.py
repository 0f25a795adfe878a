"""NOAH migration: `nas subnet import-noah` reads NOAH's released subnet configs (issue 23)."""

from __future__ import annotations

import json

import pytest

from nas.cli.main import main
from nas.core.errors import ConfigError
from nas.interop.noah_import import import_noah
from nas.space.subnet import Subnet
from nas.spec.experiment import load_spec

# NOAH's released VTAB subnet for clevr_count and its 16-shot ImageNet subnet (seed 0), as
# published in experiments/NOAH/subnet/ of NOAH's code (SEARCH_SPACE sections left out).
CLEVR = {
    "vpt": [10, 1, 5, 10, 5, 1, 10, 5, 5, 5, 10, 1],
    "lora": [1, 1, 10, 5, 10, 10, 10, 1, 5, 1, 10, 1],
    "adapter": [1, 10, 10, 10, 10, 1, 5, 10, 10, 10, 1, 1],
}
IMAGENET = {
    "vpt": [5, 10, 10] + [0] * 9,
    "lora": [5, 10, 10] + [0] * 9,
    "adapter": [10, 10, 50] + [0] * 9,
}
KEYS = {"vpt": "VISUAL_PROMPT_DIM", "lora": "LORA_DIM", "adapter": "ADAPTER_DIM"}


def noah_config(dims: dict[str, list[int]], prefix: list[int] | None = None) -> str:
    lines = [
        "MODEL_NAME: vit_base_patch16_224_in21k",
        "SUPERNET:",
        "  DEPTH: 12",
        "  VISUAL_PROMPT_DIM: 100",
        "  LORA_DIM: 100",
        "  ADAPTER_DIM: 100",
        "  PREFIX_DIM: 100",
        "  PROMPT_DEPTH: 12",
        "SEARCH_SPACE:",
        "  VISUAL_PROMPT_DIM: [10, 50, 100]",
        "RETRAIN:",
    ]
    for kind, values in dims.items():
        lines.append(f"  {KEYS[kind]}:")
        lines += [f"    - {v}" for v in values]
    lines.append("  PREFIX_DIM:")
    lines += [f"    - {v}" for v in (prefix or [0] * 12)]
    return "\n".join(lines) + "\n"


def closed_form(dims: dict[str, list[int]]) -> int:
    """NOAH's per-layer costs on ViT-B/16 (width 768, qkv 2304): VPT p*768, LoRA
    r*(768+2304), Adapter 2*768*h + h + 768 (a layer with h = 0 has none)."""
    vpt = sum(p * 768 for p in dims.get("vpt", []))
    lora = sum(r * (768 + 2304) for r in dims.get("lora", []))
    adapter = sum(2 * 768 * h + h + 768 for h in dims.get("adapter", []) if h)
    return vpt + lora + adapter


@pytest.mark.parametrize("dims", [CLEVR, IMAGENET], ids=["vtab-clevr", "fewshot-imagenet"])
def test_import_noah_round_trips_with_exact_parameter_counts(tmp_path, capsys, dims):
    src = tmp_path / "ViT-B_prompt_x.yaml"
    src.write_text(noah_config(dims))
    out = tmp_path / "subnet.yaml"
    assert main(["subnet", "import-noah", str(src), "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == closed_form(dims)
    assert info["model"] == "vit_base_patch16_224_in21k"
    assert info["source"] == str(src)
    # depth: the blocks up to the last non-zero dim (ImageNet's subnets stop after block 3)
    for kind, values in dims.items():
        depth = max(i + 1 for i, v in enumerate(values) if v)
        assert info["canonical"][kind] == {"depth": depth, "dims": values[:depth]}
    # the written YAML is a subnet that `nas subnet show` reads to the same report
    assert Subnet.load(out) == import_noah(src).subnet
    assert main(["subnet", "show", str(out), "--space", "noah_vtab", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in info.items() if k not in ("source", "model", "written")} == shown
    # dims {1, 5, 10} are noah_vtab's; the ImageNet subnet's adapter of 50 is not
    assert shown["in_space"] is (dims is CLEVR)


def test_import_noah_prints_like_subnet_show(tmp_path, capsys):
    src = tmp_path / "clevr.yaml"
    src.write_text(noah_config(CLEVR))
    assert main(["subnet", "import-noah", str(src)]) == 0
    text = capsys.readouterr().out
    assert "in space      yes  (noah-vtab)" in text
    assert f"trainable     {closed_form(CLEVR):,} module parameters" in text


def test_out_is_not_overwritten_with_other_contents(tmp_path, capsys):
    src, out = tmp_path / "clevr.yaml", tmp_path / "mine.yaml"
    src.write_text(noah_config(CLEVR))
    out.write_text("vpt: {depth: 1, dims: [1]}\n")
    assert main(["subnet", "import-noah", str(src), "--out", str(out)]) == 2
    assert "already exists with other contents" in capsys.readouterr().err
    assert out.read_text() == "vpt: {depth: 1, dims: [1]}\n"
    assert main(["subnet", "import-noah", str(src), "--out", str(out), "--force"]) == 0
    assert Subnet.load(out) == import_noah(src).subnet


BAD = [
    ("- 1\n- 2\n", "expected NOAH's subnet config"),
    ("MODEL_NAME: vit_base_patch16_224_in21k\n", "missing required key 'RETRAIN'"),
    ("RETRAIN:\n  LORA_DIM: [1, 2]\n", "RETRAIN.LORA_DIM: has 2 dims; expected one per block (12)"),
    ("RETRAIN:\n  LORA_DIM: 4\n", "RETRAIN.LORA_DIM: expected a list of 12"),
    ("RETRAIN:\n  LORA_DIM: [1, -1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]\n", "LORA_DIM[1]"),
    ("RETRAIN:\n  PREFIX_DIM: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]\n", "names no module"),
    (
        "RETRAIN:\n  LORA_DIM: [1,0,0,0,0,0,0,0,0,0,0,0]\n"
        "  PREFIX_DIM: [5,0,0,0,0,0,0,0,0,0,0,0]\n",
        "prefix tuning is not offered",
    ),
    ("RETRAIN:\n  BIAS_DIM: [1]\n", "RETRAIN.BIAS_DIM: unknown key"),
    (
        "SUPERNET: {LORA_DIM: 10}\nRETRAIN:\n  LORA_DIM: [50,0,0,0,0,0,0,0,0,0,0,0]\n",
        "50 exceeds the supernet's maximum SUPERNET.LORA_DIM = 10",
    ),
    (
        "MODEL_NAME: swin_base_patch4\nRETRAIN:\n  LORA_DIM: [1,0,0,0,0,0,0,0,0,0,0,0]\n",
        "is not a ViT-B/16",
    ),
    ("RETRAIN: [\n", "YAML syntax error"),
    (  # another resolution of ViT-B/16: its VPT FLOPs would be counted at 224
        "MODEL_NAME: vit_base_patch16_384\nRETRAIN:\n  LORA_DIM: [1,0,0,0,0,0,0,0,0,0,0,0]\n",
        "'vit_base_patch16_384' takes 384-pixel images",
    ),
    (  # every dim 0: not silently a linear probe
        "RETRAIN:\n  LORA_DIM: [0,0,0,0,0,0,0,0,0,0,0,0]\n"
        "  ADAPTER_DIM: [0,0,0,0,0,0,0,0,0,0,0,0]\n",
        "RETRAIN: every dim is 0: an empty subnet",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_malformed_or_foreign_files_are_one_clear_error(tmp_path, capsys, text, message):
    src = tmp_path / "noah.yaml"
    src.write_text(text)
    with pytest.raises(ConfigError) as err:
        import_noah(src)
    assert message in str(err.value) and str(src) in str(err.value)
    assert main(["subnet", "import-noah", str(src)]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and message in captured.err


def test_a_retrain_only_spec_names_noah_configs_as_baselines(tmp_path):
    (tmp_path / "noah").mkdir()
    (tmp_path / "noah" / "clevr.yaml").write_text(noah_config(CLEVR))
    (tmp_path / "mine.yaml").write_text("lora: {depth: 12, dims: 8}\n")
    spec_text = """
name: noah-baselines
datasets: [{name: clevr_count, format: vtab, root: /nowhere}]
space: noah_vtab
stages:
  search: {enabled: false}
  retrain:
    baselines:
      noah: noah/clevr.yaml
      lora8: mine.yaml
"""
    (tmp_path / "spec.yaml").write_text(spec_text)
    spec = load_spec(tmp_path / "spec.yaml", check_data=False)
    assert spec.retrain.baselines["noah"] == import_noah(tmp_path / "noah" / "clevr.yaml").subnet
    assert spec.retrain.baselines["lora8"] == Subnet({"lora": [8] * 12})
    # the spec's identity is the subnet, not the file it came from
    moved = tmp_path / "elsewhere.yaml"
    moved.write_text(noah_config(CLEVR))
    (tmp_path / "spec2.yaml").write_text(spec_text.replace("noah/clevr.yaml", str(moved)))
    assert load_spec(tmp_path / "spec2.yaml", check_data=False).hash() == spec.hash()


def test_a_bad_baseline_file_names_the_spec_key_and_the_file(tmp_path):
    (tmp_path / "broken.yaml").write_text("RETRAIN:\n  LORA_DIM: [1, 2]\n")
    (tmp_path / "spec.yaml").write_text(
        "datasets: [{name: d, format: vtab, root: /nowhere}]\nspace: noah_vtab\n"
        "stages: {search: {enabled: false}, retrain: {baselines: {a: broken.yaml, "
        "b: missing.yaml}}}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_spec(tmp_path / "spec.yaml", check_data=False)
    text = str(err.value)
    assert "stages.retrain.baselines.a" in text and "broken.yaml" in text
    assert "has 2 dims" in text
    (tmp_path / "broken.yaml").write_text(noah_config(CLEVR))
    with pytest.raises(ConfigError, match=r"baselines\.b: subnet file not found: .*missing.yaml"):
        load_spec(tmp_path / "spec.yaml", check_data=False)


def test_a_noah_subnet_is_refused_for_a_shallower_backbone(tmp_path, capsys):
    """NOAH's subnets span ViT-B/16's 12 blocks: a 6-block space cannot hold them."""
    src = tmp_path / "clevr.yaml"
    src.write_text(noah_config(CLEVR))
    assert main(["subnet", "import-noah", str(src), "--space", "tiny_cpu"]) == 2
    err = capsys.readouterr().err
    assert "not a subnet of --space tiny_cpu" in err and "(6)" in err and "Traceback" not in err
    (tmp_path / "spec.yaml").write_text(
        "datasets: [{name: digits, format: mini-vtab}]\nspace: tiny_cpu\n"
        "stages: {search: {enabled: false}, retrain: {baselines: {noah: clevr.yaml}}}\n"
    )
    with pytest.raises(ConfigError, match=r"baselines\.noah: its modules span more blocks"):
        load_spec(tmp_path / "spec.yaml")
