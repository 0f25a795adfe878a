"""The CLI imports only what a command needs (issue 41): its help and parser load none of
torch, timm, Ray, MLflow or Optuna; `nas space show` loads no Ray, MLflow or Optuna (it needs
torch and timm: a kind's counts are classmethods of its nn.Module class, and a timm backbone's
geometry is read off the model built on the meta device)."""

from __future__ import annotations

from benchmarks.cli_time import HEAVY, imported


def test_help_imports_nothing_heavy():
    assert not imported(("--help",)) & set(HEAVY)
    assert not imported(("run", "--help")) & set(HEAVY)


def test_space_show_imports_no_ray_mlflow_or_optuna():
    loaded = imported(("space", "show", "tiny_cpu"))
    assert "nas" in loaded and "torch" in loaded  # the check reads real imports
    assert not loaded & {"ray", "mlflow", "optuna"}
