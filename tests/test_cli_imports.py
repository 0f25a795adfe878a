"""The CLI imports only what a command needs (issue 41): its help and parser load none of
torch, timm, Ray, MLflow or Optuna; `nas space show` loads no Ray, MLflow or Optuna (it needs
torch and timm: a kind's counts are classmethods of its nn.Module class, and a timm backbone's
geometry is read off the model built on the meta device)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = {"torch", "timm", "ray", "mlflow", "optuna", "torchvision", "open_clip"}


def imported(*args: str) -> set[str]:
    """The top-level packages ``python -X importtime -m nas ARGS`` imports."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "nas", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    names = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def test_help_imports_nothing_heavy():
    assert not imported("--help") & HEAVY
    assert not imported("run", "--help") & HEAVY


def test_space_show_imports_no_ray_mlflow_or_optuna():
    loaded = imported("space", "show", "tiny_cpu")
    assert "nas" in loaded and "torch" in loaded  # the check reads real imports
    assert not loaded & {"ray", "mlflow", "optuna"}
