"""The CLI imports only what a command needs (issue 41): its help and parser load none of
torch, timm, Ray, MLflow or Optuna; describing a space (`nas space show`, `nas space
validate`, `nas subnet show`) loads none of them either where the space's kinds have a torch-free
side and its backbone records its geometry: every shipped ViT space; nor does `nas subnet
import-noah`. `nas space validate` does load timm to check a recorded geometry (and with it
the model's name) against the model. PGN's counts are read off timm's ResNet (its generators)
and a CLIP's geometry off its model, so those spaces still load torch."""

from __future__ import annotations

import pytest

from benchmarks.cli_time import HEAVY, imported
from nas.core.paths import SPACES_DIR
from nas.modules import REGISTRY, kind_class, module_class
from nas.space.search_space import load_space
from tests.test_noah_import import CLEVR, noah_config

#: the shipped spaces whose description needs torch, and why (see the module docstring)
NEED_TORCH = {
    "clip_cpu": "a CLIP",
    "clip_vitb16": "a CLIP",
    "noah_pgn_border_cpu": "PGN",
    "noah_pgn_cpu": "PGN",
    "pgn_cpu": "PGN",
}
LIGHT_SPACES = sorted(p.stem for p in SPACES_DIR.glob("*.yaml") if p.stem not in NEED_TORCH)


def test_help_imports_nothing_heavy():
    assert not imported(("--help",)) & set(HEAVY)
    assert not imported(("run", "--help")) & set(HEAVY)


def test_describing_a_space_imports_nothing_heavy(tmp_path):
    loaded = imported(("space", "show", "tiny_cpu"))
    assert "nas" in loaded and "yaml" in loaded  # the check reads real imports
    assert not loaded & set(HEAVY)
    files = [str(SPACES_DIR / f"{name}.yaml") for name in LIGHT_SPACES]
    assert len(files) >= 9
    assert not any(imported(("space", "show", f)) & set(HEAVY) for f in files[:3])
    subnet = tmp_path / "subnet.yaml"
    subnet.write_text("vpt: {depth: 6, dims: 8}\nlora: {depth: 6, dims: 4}\n")
    assert not imported(("subnet", "show", str(subnet), "--space", "tiny_cpu")) & set(HEAVY)
    noah = tmp_path / "clevr.yaml"
    noah.write_text(noah_config(CLEVR))
    assert not imported(("subnet", "import-noah", str(noah))) & set(HEAVY)


def test_a_space_with_pgn_says_why_it_needs_torch():
    assert "torch" in imported(("space", "show", "pgn_cpu"))


def test_every_module_class_is_its_kind_with_weights():
    """The torch-free side answers for the module: same class attributes, and the module class
    subclasses it (so their counts are one code)."""
    for kind in REGISTRY:
        light, module = kind_class(kind), module_class(kind)
        assert issubclass(module, light), kind
        assert light.kind == module.kind == kind
        assert (light.sites, light.mergeable, light.peft_type, light.noah_key) == (
            module.sites,
            module.mergeable,
            module.peft_type,
            module.noah_key,
        )


@pytest.mark.parametrize("name", LIGHT_SPACES)
def test_a_recorded_geometry_is_the_models(name):
    """A backbone's recorded geometry (what describing a space reads) is the one timm's model
    has, for every shipped space that records one."""
    from nas.families.vit.spec import _geometry

    backbone = load_space(name).backbone
    assert backbone.recorded is not None, name
    assert backbone.recorded == _geometry(backbone.key())


def test_validating_checks_the_recorded_geometry_against_the_model(tmp_path, capsys):
    """What `space show` takes on trust, `space validate` checks: a mistyped model name in a
    space that records its geometry is one error naming the file (the model is built on
    ``meta``), not an "ok"."""
    from nas.cli.main import main

    text = (SPACES_DIR / "vpt_only.yaml").read_text()
    typo = tmp_path / "typo.yaml"
    typo.write_text(text.replace("model: vit_base_patch16_224", "model: vit_base_patch16_22"))
    assert main(["space", "validate", str(typo)]) == 2
    err = capsys.readouterr().err
    assert f"{typo}: backbone.model: unknown timm model 'vit_base_patch16_22'" in err, err
    assert "(similar: vit_base_patch16_224," in err, err
    assert "Traceback" not in err
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(text.replace("num_heads: 12", "num_heads: 6"))
    assert main(["space", "validate", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert f"{wrong}: backbone geometry does not match the model: num_heads 6 (the model" in err
    assert main(["space", "validate", str(SPACES_DIR / "vpt_only.yaml")]) == 0
