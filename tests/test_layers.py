"""The package's shape, read from its source: no import cycle among nas/ and trainers/
(function-level imports included), and registries that import none of their entries."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from scripts import import_graph
from tests.conftest import REPO


def test_no_import_cycle_even_through_function_level_imports():
    edges, _ = import_graph.graph()
    assert "nas.families.vit.spec" in edges and "nas.pipeline.stage" in edges  # the graph was read
    assert import_graph.cycles(edges) == []
    # ...and the graph sees a cycle where there is one (function-level, as before this issue)
    edges = {**edges, "nas.towers.geometry": {"nas.families.vit.model"}}
    assert any("nas.towers.geometry" in c for c in import_graph.cycles(edges))


def test_the_script_says_so_and_fails_on_a_cycle(tmp_path):
    done = subprocess.run(
        [sys.executable, "scripts/import_graph.py", "--cycles"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("0 import cycle(s)")


def test_registries_import_none_of_their_entries():
    """In a fresh interpreter: loading the registries imports no family, kind, algorithm or
    stage until one is asked for (nor torch, Ray or MLflow for the stage and family ones)."""
    code = """
import sys
import nas.pipeline.stage, nas.space.backbones
heavy = [m for m in ("torch", "ray", "mlflow") if m in sys.modules]
import nas.modules, nas.search
loaded = sorted(m for m in sys.modules if m.startswith(("nas.", "trainers")))
entries = ["nas.families.vit.model", "nas.families.clip.spec", "nas.families.clip.model",
           "nas.families.vit.spec", "nas.modules.vpt", "nas.modules.lora", "nas.modules.adapter",
           "nas.modules.pgn", "nas.modules.upt", "nas.search.optuna_search",
           "nas.pipeline.hparams", "nas.pipeline.retrain", "nas.training.train"]
print([m for m in entries if m in loaded])
print(heavy)  # the stage and family registries need none of them
nas.modules.module_class("pgn")
print("nas.modules.pgn" in sys.modules, "nas.modules.upt" in sys.modules)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.split("\n")[:3] == ["[]", "[]", "True False"]


def test_a_registry_resolves_a_string_once_and_takes_objects():
    from nas.core.registry import Registry, resolve

    reg = Registry("thing", {"path": "pathlib:Path"})
    assert "path" in reg and list(reg) == ["path"]
    assert reg["path"] is importlib.import_module("pathlib").Path
    assert reg._entries["path"] is reg["path"]  # resolved once, kept

    @reg.register("mine")
    class Mine:
        pass

    assert reg["mine"] is Mine and resolve(Mine) is Mine
    try:
        resolve("no-colon")
    except ValueError as exc:
        assert "package.module:attr" in str(exc)
    else:
        raise AssertionError("a reference without ':' resolved")


def test_search_plots_write_nothing_into_the_home_folder(tmp_path):
    """matplotlib's font cache goes to the temporary folder (or the user's MPLCONFIGDIR), not
    under ~/.cache: a search's plots, drawn in a fresh interpreter whose home is empty."""
    home = tmp_path / "home"
    home.mkdir()
    code = f"""
from pathlib import Path
from nas.search.base import Evaluated
from nas.space.search_space import load_space
from nas.tracking.plots import plot_search
import random
space = load_space("tiny_cpu")
rng = random.Random(0)
history = [Evaluated(space.sample(rng), 0.5 + i / 100, 1000 + i, i // 4) for i in range(12)]
paths = plot_search(history, space, history[-1].subnet, Path({str(tmp_path / "plots")!r}), "t")
print(len(paths))
"""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MPLCONFIGDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME")
    }
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**env, "HOME": str(home)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) >= 2
    assert list(home.rglob("*")) == []
    cache = Path(tempfile.gettempdir()) / f"nas-matplotlib-{os.getuid()}"
    assert cache.is_dir()
