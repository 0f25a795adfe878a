"""The benchmarks package (issue 39): its subcommands, its caches shared by processes, and the
committed result caches read back by the current code into the committed tables."""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import EXPERIMENTS
from benchmarks.cache import RESULTS, TrainedAlone, cached_run
from benchmarks.recipes import RECIPE, ground_truth_subnets, recipe_key, space_with_budget
from benchmarks.stats import paired, span
from nas.space.subnet import Subnet

REPO = Path(__file__).resolve().parents[1]


def test_every_experiment_is_a_subcommand_with_its_own_options():
    for name, (module_name, _) in EXPERIMENTS.items():
        module = importlib.import_module(f"benchmarks.{module_name}")
        parser = argparse.ArgumentParser()
        module.arguments(parser)  # builds without clashes
        assert callable(module.run), name
        assert f"python -m benchmarks {name}" in (module.__doc__ or ""), name
    listed = {p.stem for p in (REPO / "benchmarks").glob("*.py")}
    shared = {"__init__", "__main__", "cache", "common", "recipes", "stats", "value_report"}
    assert listed - shared == {m for m, _ in EXPERIMENTS.values()}


def test_cli_lists_experiments_and_refuses_an_unknown_one():
    run = [sys.executable, "-m", "benchmarks"]
    out = subprocess.run([*run, "--help"], cwd=REPO, capture_output=True, text=True, check=True)
    assert all(name in out.stdout for name in EXPERIMENTS)
    bad = subprocess.run([*run, "fidelty"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "invalid choice: 'fidelty'" in bad.stderr
    sub = subprocess.run(
        [*run, "value", "--variant", "nope"], cwd=REPO, capture_output=True, text=True
    )
    assert sub.returncode == 2 and "python -m benchmarks value" in sub.stderr


def _fill(folder: str, worker: int) -> None:
    for i in range(20):
        cached_run(Path(folder), "kind", "task", f"{worker}-{i}", lambda: {"worker": worker})
        cache = TrainedAlone("task", Path(folder) / "alone")
        s = Subnet.from_data({"lora": {"depth": 1, "dims": [worker + 1]}})
        cache.put(s, "r", {"lr": 1.0}, i, 0.5, 1.0)


def test_caches_keep_every_process_entries(tmp_path):
    ctx = multiprocessing.get_context("fork")  # the workers use no threads
    workers = [ctx.Process(target=_fill, args=(str(tmp_path), w)) for w in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    runs = json.loads((tmp_path / "kind" / "task.json").read_text())["runs"]
    assert len(runs) == 60 and runs["2-19"] == {"worker": 2}
    # a cached run is not computed again
    assert cached_run(tmp_path, "kind", "task", "0-0", lambda: pytest.fail("recomputed")) == {
        "worker": 0
    }
    alone = TrainedAlone("task", tmp_path / "alone")
    assert len(alone.entries) == 60 and alone.recipes == {"r": {"lr": 1.0}}
    assert alone.get(Subnet.from_data({"lora": {"depth": 1, "dims": [3]}}), "r", 7) == 0.5


def test_committed_ground_truth_is_found_under_the_current_recipe():
    space = space_with_budget()
    subnets = ground_truth_subnets(space, 30)
    cache = TrainedAlone("digits", RESULTS / "ground_truth")
    assert recipe_key() in cache.recipes
    assert cache.recipes[recipe_key()] == RECIPE.to_dict()
    assert all(cache.get(s, recipe_key(), seed) is not None for s in subnets for seed in (0, 1, 2))


def test_value_report_reproduces_the_committed_rows(tmp_path):
    out = tmp_path / "value.json"
    cmd = [sys.executable, "-m", "benchmarks", "value", "--report", "--variant", "sandwich_all"]
    cmd += ["--tasks", "digits", "clevr_count", "--data", str(tmp_path / "data")]
    subprocess.run([*cmd, "--json", str(out)], cwd=REPO, check=True, capture_output=True)
    committed = json.loads((RESULTS / "search_value_cpu.json").read_text())["tasks"]
    want = {(r["task"], r["seed"]): r for r in committed if r["task"] in ("digits", "clevr_count")}
    got = {(r["task"], r["seed"]): r for r in json.loads(out.read_text())["tasks"]}
    assert len(got) == 6 and got == want


def test_paired_interval():
    p = paired([1.0, 2.0, 3.0])
    assert p["mean"] == 2.0 and p["n"] == 3
    assert p["low"] == pytest.approx(2 - 4.302652729911275 / 3**0.5)  # t(0.975, 2) * sd / sqrt n
    assert span(paired([1.0])) == "—"


def test_the_kinds_benchmark_holds_every_kind_at_its_largest_uniform_size_in_budget():
    """Issue 40's benchmark spec: each single kind alone on every layer at the largest dim in
    the budget (recipes.largest_single), and Adapter+ (after the MLP, scaled) the same."""
    from benchmarks.recipes import largest_single
    from nas.modules.adapter_kind import compose
    from nas.spec.experiment import load_spec

    spec = load_spec(Path(__file__).parents[1] / "experiments/benchmark_mini_vtab_kinds.yaml")
    space, baselines = spec.space, spec.retrain.subnet_baselines()
    assert set(baselines) == {*space.modules, "adapter_plus"}
    for kind in space.modules:
        assert baselines[kind] == largest_single(space, kind), kind
    sizes = sorted(space.modules["adapter"].to_data()["dims"], reverse=True)
    plus = next(
        s
        for s in (Subnet({"adapter": (compose(d, "after_mlp", True),) * 6}) for d in sizes)
        if space.admits(s)
    )
    assert baselines["adapter_plus"] == plus and str(plus) == "adapter=(4+scale)x6"
