"""Shared fixtures: small timm ViTs that build and run in milliseconds on a CPU."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

# Nothing the tools under test do may write into the home directory or phone home.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# The tests never download: a hub request fails at once instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nas.core.yamlio import parse_yaml
from nas.families.vit.spec import BackboneSpec
from nas.space.search_space import parse_space

REPO = Path(__file__).resolve().parents[1]
#: The environment of the Ray and MLflow processes the tests start.
ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PYTHONUNBUFFERED": "1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (sqlite store, artifacts proxied), stopped by PID."""
    port = free_port()
    store = tmp_path / "mlflow-server"
    store.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{store / 'mlflow.db'}",
            "--artifacts-destination",  # served through the server's artifact proxy
            str(store / "art"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env={**os.environ, **ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3}

# Variants a prompt module must work on: class token, register tokens, average pooling,
# attention pooling, no class token, DeiT with a distillation token.
VARIANTS = {
    "cls-token": BackboneSpec("vit_tiny_patch16_224", SMALL),
    "registers": BackboneSpec("vit_tiny_patch16_224", {**SMALL, "reg_tokens": 2}),
    "avg-pool": BackboneSpec("vit_tiny_patch16_224", {**SMALL, "global_pool": "avg"}),
    "attn-pool": BackboneSpec("vit_tiny_patch16_224", {**SMALL, "global_pool": "map"}),
    "no-cls": BackboneSpec(
        "vit_tiny_patch16_224", {**SMALL, "class_token": False, "global_pool": "avg"}
    ),
    "deit-distilled": BackboneSpec("deit_tiny_distilled_patch16_224", SMALL),
}


def small_space_yaml(
    model: str = "vit_tiny_patch16_224", overrides: dict | None = None, extra: str = ""
) -> str:
    overrides = SMALL if overrides is None else overrides
    return f"""
backbone:
  model: {model}
  overrides: {overrides}
modules:
  vpt: {{dims: [0, 2, 3], depths: [1, 2, 4], max_dim: 5}}
  lora: {{dims: [1, 4], depths: [2, 4], max_dim: 6}}
  adapter: {{dims: [0, 3, 8], depths: [0, 3], max_dim: 8}}
{extra}"""


def _release(package: str) -> tuple[int, ...]:
    from importlib.metadata import version

    return tuple(int(p) for p in version(package).split(".")[:2] if p.isdigit())


def pytest_configure(config):
    """Under ``--dist loadgroup`` (scripts/test.sh) each ``xdist_group`` runs on one worker,
    so its shared fixtures (a whole ``nas run``) are made once. With pytest 9.2 and
    pytest-xdist up to 3.8 the grouping is silently lost (pytest-dev/pytest-xdist#1386) and
    every group's fixtures run on each worker: refused, with the fix."""
    if config.getoption("dist", None) != "loadgroup" or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if _release("pytest") >= (9, 2) and _release("pytest-xdist") <= (3, 8):
        raise pytest.UsageError(
            "--dist loadgroup does not group tests with pytest 9.2 and pytest-xdist <= 3.8 "
            "(pytest-dev/pytest-xdist#1386): run bash scripts/setup.sh to install the "
            "versions pyproject.toml's dev extra pins"
        )


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def small_space():
    return parse_space(parse_yaml(small_space_yaml()))


def space_for(spec: BackboneSpec):
    return parse_space(parse_yaml(small_space_yaml(spec.model, spec.overrides)))


def randomise_modules(model: torch.nn.Module) -> None:
    """Give every module weight (LoRA's zero-initialised B included) a nonzero value, so that
    equivalence tests compare modules that actually change the output."""
    with torch.no_grad():
        for p in model.prompt_modules.parameters():
            p.normal_(0.0, 0.2)


@pytest.fixture(scope="session")
def mini_vtab_data(tmp_path_factory):
    """Two mini-VTAB tasks (digits, dsprites_loc) with 200 test images each, prepared once."""
    from nas.data.mini_vtab import prepare

    out = tmp_path_factory.mktemp("mv")
    prepare(out, ("digits", "dsprites_loc"), test_size=200, log=lambda *_: None)
    return out


#: The sizes of ``small_mini_vtab``'s lists: train, val (trainval is both), test.
SMALL_SPLITS = {"train800.txt": 256, "val200.txt": 64, "test.txt": 128}


def shorten_mini_vtab(src: Path, out: Path) -> Path:
    """A copy of the mini-VTAB tasks prepared under ``src`` with shorter lists (the first
    ``SMALL_SPLITS`` lines of each; trainval both) and its manifest's counts, per-class counts
    and content hashes recomputed as ``prepare`` computes them. Same layout and file names."""
    import json
    import shutil

    from nas.data.lists import read_vtab
    from nas.data.mini_vtab import split_entry

    manifest = json.loads((src / "manifest.json").read_text())
    for task, entry in manifest["tasks"].items():
        shutil.copytree(src / task, out / task)
        for name, size in SMALL_SPLITS.items():
            lines = (out / task / name).read_text().splitlines()[:size]
            (out / task / name).write_text("\n".join(lines) + "\n")
        both = [(out / task / n).read_text() for n in ("train800.txt", "val200.txt")]
        (out / task / "train800val200.txt").write_text("".join(both))
        for split, listed in read_vtab(out / task).items():
            entry["splits"][split] |= split_entry(listed, entry["num_classes"])
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


@pytest.fixture(scope="session")
def small_mini_vtab(tmp_path_factory, mini_vtab_data):
    """``mini_vtab_data`` with shorter lists (256 train, 64 val, 128 test images per task),
    for the end-to-end runs: every stage, resume and record is the same code on a quarter of
    the images."""
    return shorten_mini_vtab(mini_vtab_data, tmp_path_factory.mktemp("mv-small"))
