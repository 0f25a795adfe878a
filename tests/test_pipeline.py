"""The pipeline end to end through real Ray and a real MLflow store, and kill-and-resume.

Each run is a separate `nas run` process with its own Ray temp folder; whatever Ray leaves
behind after a kill is stopped by PID."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from nas import families
from nas.data.decode import decode_split
from nas.data.lists import read_vtab
from nas.families.vit.model import PromptedViT
from nas.space.search_space import load_space
from nas.training.evaluate import evaluate
from tests.conftest import REPO

SPEC = {
    "name": "ci",
    "description": "The CI's end-to-end run: two mini-VTAB tasks on the offline ViT.",
    "mlflow": {"register": True},
    "datasets": [
        {"name": "digits", "format": "mini-vtab"},
        {"name": "dsprites_loc", "format": "mini-vtab"},
    ],
    "backbone": "vit_fmnist",
    "space": "tiny_cpu",
    "seeds": [0],
    "resources": {"cpus": 1, "gpus": 0},
    "stages": {
        "supernet": {
            "epochs": 4,
            "batch_size": 64,
            "lr": 5.0e-3,
            "warmup_epochs": 1,
            "checkpoint_every": 1,
        },
        "search": {
            "algorithm": "evolution",
            "options": {
                "generations": 3,
                "population": 10,
                "top_k": 3,
                "mutations": 4,
                "crossovers": 4,
            },
        },
        "retrain": {
            "top_k": 2,
            "epochs": 2,
            "lr": 5.0e-3,
            "warmup_epochs": 0,
            "baselines": {"lora4": {"lora": {"depth": 6, "dims": 4}}},
        },
    },
}


def ray_pids(tmpdir: str) -> list[int]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if tmpdir in line]


def start(spec_path: Path, output: Path, data: Path) -> tuple[subprocess.Popen, str]:
    tmpdir = tempfile.mkdtemp(prefix="nr", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": tmpdir, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nas", "run", str(spec_path), "--output", str(output)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    return proc, tmpdir


def stop(proc: subprocess.Popen, tmpdir: str, sig=signal.SIGKILL) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=60)
    for pid in ray_pids(tmpdir):  # what Ray started and a kill left behind
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(tmpdir, ignore_errors=True)


def run_to_end(spec_path: Path, output: Path, data: Path) -> str:
    proc, tmpdir = start(spec_path, output, data)
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        stop(proc, tmpdir)
    assert proc.returncode == 0, out[-3000:]
    return out


def run_in_terminal(spec_path: Path, output: Path, data: Path) -> str:
    """``nas run`` to the end with a terminal (a pty) as its stdout and stderr, as a person
    runs it: everything the terminal received, escape codes included."""
    tmpdir = tempfile.mkdtemp(prefix="nr", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": tmpdir, "COLUMNS": "160", "LINES": "40"}
    env.pop("NAS_PROGRESS", None)
    main, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nas", "run", str(spec_path), "--output", str(output)],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
        start_new_session=True,
    )
    os.close(terminal)
    received = bytearray()
    deadline = time.time() + 900
    try:
        while time.time() < deadline:
            ready, _, _ = select.select([main], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # the terminal closed: every writer has exited
                    break
                if not chunk:
                    break
                received += chunk
            elif proc.poll() is not None:
                break
        proc.wait(timeout=60)
    finally:
        os.close(main)
        stop(proc, tmpdir)
    screen = received.decode(errors="replace")
    assert proc.returncode == 0, screen[-3000:]
    return screen


def kill_when(spec_path: Path, output: Path, data: Path, ready) -> None:
    proc, tmpdir = start(spec_path, output, data)
    try:
        deadline = time.time() + 600
        while not ready():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "the run never reached the kill point"
            time.sleep(0.2)
    finally:
        stop(proc, tmpdir)


# Session-scoped, so that under pytest-xdist the one worker of the "pipeline" group keeps them
# however its items interleave with other modules'.
@pytest.fixture(scope="session")
def workdir(tmp_path_factory, small_mini_vtab) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    spec = {**SPEC, "datasets": [{**d, "root": str(small_mini_vtab)} for d in SPEC["datasets"]]}
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    return root


@pytest.fixture(scope="session")
def uninterrupted(workdir, small_mini_vtab) -> Path:
    """The spec run to the end in a terminal; what the terminal showed is beside it."""
    out = workdir / "uninterrupted"
    screen = run_in_terminal(workdir / "spec.yaml", out, small_mini_vtab)
    (workdir / "uninterrupted.screen").write_text(screen)
    return out


@pytest.mark.xdist_group("pipeline")
def test_terminal_shows_one_live_view_and_nothing_of_ray_or_mlflow(uninterrupted, workdir):
    screen = (workdir / "uninterrupted.screen").read_text()
    # the live view, redrawn in place: a line per running trial and the stage's totals
    assert re.search(r"\[supernet digits seed 0\] epoch \d+/\d+: loss [\d.]+, train acc", screen)
    assert re.search(r"\[search \w+ seed 0\] round \d+: \d+/\d+ candidates, best val", screen)
    assert re.search(r"retrain: 6 trials, \d+ done, \d+ running, \d+ waiting", screen)
    assert "\x1b[2K" in screen and "\x1b[1A" in screen  # erased and redrawn, not scrolled
    assert "== retrain: " in screen and "| dataset " in screen  # the stages and the results
    for noise in (
        "(_trainable pid=",  # Ray's worker prefix
        "Configuration for experiment",  # Tune's tables and hints
        "View detailed results",
        "tensorboard",
        "Trial status",
        "INFO worker.py",  # "Started a local Ray instance"
        "INFO tune.py",
        "View run",  # MLflow's run links
        "Add type hints",  # MLflow's advice on PythonModel
    ):
        assert noise.lower() not in screen.lower(), noise


def mlflow_runs(output: Path, experiment: str = "ci"):
    """The MLflow client of a run's store and every run of its experiment."""
    client = MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=5000)


def parent_run(runs, stage: str, **tags: str):
    """The one parent (not candidate) run of ``stage`` whose ``nas.*`` tags match ``tags``."""
    return next(
        r
        for r in runs
        if r.data.tags.get("nas.stage") == stage
        and "mlflow.parentRunId" not in r.data.tags
        and all(r.data.tags.get(f"nas.{k}") == v for k, v in tags.items())
    )


@pytest.mark.xdist_group("pipeline")  # one uninterrupted run
def test_end_to_end_mlflow_and_artifacts(uninterrupted, small_mini_vtab):
    client, runs = mlflow_runs(uninterrupted)
    kinds = Counter(
        (r.data.tags.get("nas.stage"), "mlflow.parentRunId" in r.data.tags) for r in runs
    )
    evaluated = sum(
        len((uninterrupted / "search" / f"{d}-seed0" / "candidates.jsonl").read_text().splitlines())
        for d in ("digits", "dsprites_loc")
    )
    assert evaluated == 2 * 30  # 3 generations of 10, none evaluated twice
    assert kinds == {
        ("supernet", False): 2,
        ("search", False): 2,
        ("search", True): evaluated,
        ("retrain", False): 2 * 3,
    }
    assert all(r.info.status == "FINISHED" for r in runs)
    # a model-training experiment (MLflow 3.17's UI would open an unknown kind as GenAI), and
    # every run tagged with the output folder that made it
    experiment = client.get_experiment_by_name("ci")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert {r.data.tags["nas.output"] for r in runs} == {str(uninterrupted)}
    results = json.loads((uninterrupted / "results.json").read_text())
    roles = Counter(r["role"] for r in results["rows"])
    assert roles == {"searched": 2, "searched (not reported)": 2, "baseline": 2}
    assert set(results["per_dataset"]) == {"digits", "dsprites_loc"}
    assert set(results["group_means"]) == {"natural", "structured"}

    # The search runs carry the candidate table and the plots.
    search = next(
        r
        for r in runs
        if r.data.tags.get("nas.stage") == "search" and "mlflow.parentRunId" not in r.data.tags
    )
    files = {a.path for a in client.list_artifacts(search.info.run_id)}
    files |= {a.path for a in client.list_artifacts(search.info.run_id, "plots")}
    assert {
        "candidates.csv",
        "plots/accuracy_vs_cost.png",
        "plots/accuracy_per_round.png",
        "plots/winner_layers.png",
    } <= files

    # A winner reloads from MLflow alone and reproduces its recorded test accuracy.
    winner = next(
        r
        for r in runs
        if r.data.tags.get("nas.stage") == "retrain"
        and r.data.tags.get("nas.label") == "rank1"
        and r.data.tags.get("nas.dataset") == "digits"
    )
    local = client.download_artifacts(winner.info.run_id, "model", str(uninterrupted / "dl"))
    space = load_space("tiny_cpu")
    model = PromptedViT.load(local, space.backbone.create(10)).eval()
    assert families.load(local).subnet == model.subnet  # the generic loader finds the same
    test = decode_split(read_vtab(small_mini_vtab / "digits")["test"], 28, 1)
    mean, std = space.backbone.normalisation()
    acc = evaluate(model, test, mean=mean, std=std)
    assert abs(acc - winner.data.metrics["test_acc"]) < 1e-9
    # `nas report` rebuilds the same table from the MLflow store alone.
    from nas.pipeline.reports import results_from_mlflow

    again = results_from_mlflow(f"sqlite:///{uninterrupted / 'mlflow.db'}", "ci")
    assert again["per_dataset"] == results["per_dataset"]
    assert again["group_means"] == results["group_means"]
    # The provenance names the spec, the code and the data.
    prov = json.loads((uninterrupted / "provenance.json").read_text())
    assert prov["spec_hash"] == results["spec_hash"]
    assert set(prov["data_sha256"]) == {"digits", "dsprites_loc"}
    assert prov["backbone_weights_sha256"]
    # ... and every run the pixels and labels it saw: the same hashes as the prepared data.
    supernet = next(
        r
        for r in runs
        if r.data.tags.get("nas.stage") == "supernet" and r.data.tags["nas.dataset"] == "digits"
    )
    assert supernet.data.params["data.train.sha256"] == prov["data_sha256"]["digits"]["train"]

    # MLflow 3's views: the experiment's description, a LoggedModel per retrained model (the
    # Models column), each dataset's winner registered with the alias champion.
    experiment = client.get_experiment_by_name("ci")
    assert experiment.tags["mlflow.note.content"] == SPEC["description"]
    models = client.search_logged_models([experiment.experiment_id])
    by_run = {m.source_run_id: m.model_id for m in models}
    retrained = results["rows"]
    assert len(models) == len(retrained) == 6
    assert all(by_run[r["mlflow_run_id"]] == r["mlflow_model_id"] for r in retrained)
    by_id = {r.info.run_id: r for r in runs}
    for dataset in ("digits", "dsprites_loc"):
        champion = client.get_model_version_by_alias(f"ci-{dataset}", "champion")
        (row,) = [r for r in retrained if r["dataset"] == dataset and r["role"] == "searched"]
        assert champion.tags["nas.model_id"] == row["mlflow_model_id"]
        # the retrain run links to its candidate run (tagged chosen) and its search run
        tags = by_id[row["mlflow_run_id"]].data.tags
        candidate = by_id[tags["nas.candidate_run_id"]]
        assert candidate.data.tags["nas.chosen"] == "rank1"
        assert candidate.data.tags["mlflow.parentRunId"] == tags["nas.search_run_id"]
        assert float(candidate.data.metrics["val_acc"]) == row["val_acc"]
    chosen = Counter(r.data.tags.get("nas.chosen") for r in runs if "nas.chosen" in r.data.tags)
    assert chosen == {"rank1": 2, "rank2": 2}  # top_k 2 per dataset
    # every parent run says in one line what it is
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert all(r.data.tags.get("mlflow.note.content") for r in parents)


@pytest.mark.xdist_group("pipeline")  # one uninterrupted run
def test_kill_and_resume_matches_an_uninterrupted_run(workdir, uninterrupted, small_mini_vtab):
    out = workdir / "killed"
    spec = workdir / "spec.yaml"
    # Killed (SIGKILL, driver and Ray) in the middle of supernet training ...
    kill_when(spec, out, small_mini_vtab, lambda: any((out / "supernet").glob("*/state.pt")))
    # ... and again in the middle of the search.
    kill_when(
        spec,
        out,
        small_mini_vtab,
        lambda: any(
            len(p.read_text().splitlines()) >= 12
            for p in (out / "search").glob("*/candidates.jsonl")
        ),
    )
    run_to_end(spec, out, small_mini_vtab)

    for d in ("digits", "dsprites_loc"):
        a = (uninterrupted / "search" / f"{d}-seed0" / "candidates.jsonl").read_text()
        b = (out / "search" / f"{d}-seed0" / "candidates.jsonl").read_text()
        assert a == b  # same candidates, same order, same scores, none evaluated twice
    ra = json.loads((uninterrupted / "results.json").read_text())
    rb = json.loads((out / "results.json").read_text())
    assert ra["per_dataset"] == rb["per_dataset"]
    _, runs_a = mlflow_runs(uninterrupted)
    _, runs_b = mlflow_runs(out)
    key = lambda r: (r.data.tags.get("nas.stage"), "mlflow.parentRunId" in r.data.tags)  # noqa: E731
    assert Counter(map(key, runs_a)) == Counter(map(key, runs_b))  # no duplicated runs
    client_b, _ = mlflow_runs(out)
    experiment = client_b.get_experiment_by_name("ci").experiment_id
    assert len(client_b.search_logged_models([experiment])) == 6  # nor models
    assert len(client_b.search_model_versions("name = 'ci-digits'")) == 1  # nor versions
    assert all(r.info.status == "FINISHED" for r in runs_b)


@pytest.mark.xdist_group("pipeline")  # one uninterrupted run
def test_another_spec_in_the_same_output_is_refused(workdir, uninterrupted):
    changed = yaml.safe_load((workdir / "spec.yaml").read_text())
    changed["stages"]["search"]["options"]["generations"] = 4
    (workdir / "changed.yaml").write_text(yaml.safe_dump(changed))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "nas",
            "run",
            str(workdir / "changed.yaml"),
            "--output",
            str(uninterrupted),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 2
    assert "holds a run of a different spec (changed: search.options.generations)" in result.stderr
    assert "Traceback" not in result.stderr


def test_hparams_stage_feeds_later_stages(tmp_path, small_mini_vtab):
    spec = {
        "name": "hp",
        "datasets": [{"name": "digits", "format": "mini-vtab", "root": str(small_mini_vtab)}],
        "backbone": "vit_fmnist",
        "space": "tiny_cpu",
        "budget": {"params": {"max": 20000}},
        "stages": {
            "hparams": {
                "enabled": True,
                "lrs": [1.0e-4, 5.0e-3],
                "weight_decays": [1.0e-4],
                "epochs": 3,
                "grace_period": 1,
                "reduction_factor": 2,
                "eval_subnets": 2,
                "module_lrs": {"lora": [1, 4]},  # the supernet's sweep: 2 x 2 points
                "sweep_searched": True,  # after the search, the winner's own 2 x 2 points
            },
            "supernet": {
                "epochs": 1,
                "warmup_epochs": 0,
                "sampling": "balanced",
                "in_budget": True,
                "sandwich": True,
                "distill": 0.5,
            },
            "search": {"algorithm": "random", "options": {"num_candidates": 4, "batch_size": 4}},
            "retrain": {
                "epochs": 1,
                "warmup_epochs": 0,
                "baselines": {"lora4": {"lora": {"depth": 6, "dims": 4}}},
            },
        },
    }
    path = tmp_path / "hp.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    # Killed as soon as the first sweep has its winner: the rerun keeps it and runs the other.
    sweeps = out / "hparams" / "digits"
    kill_when(path, out, small_mini_vtab, lambda: any(sweeps.glob("*/done.json")))
    kept = {p.parent.name: p.read_text() for p in sweeps.glob("*/done.json")}
    log = run_to_end(path, out, small_mini_vtab)
    assert f"== hparams: {2 - len(kept)} of 2 sweeps to run" in log and len(kept) == 1
    # The live progress: every stage's lines say how far it is and how long is left.
    for stage in ("hparams", "supernet", "search", "retrain"):
        assert re.search(rf"\[{stage} digits seed 0[^\]]*\] .*, ~\d+ s left", log), stage
    assert all((sweeps / name / "done.json").read_text() == text for name, text in kept.items())
    # Every stage of one invocation shares one Tune run (GroupedASHA keeps the sweeps' points
    # apart): the killed one's and the rerun's.
    assert len(list((out / "ray").glob("run-*"))) == 2
    winners = {}
    for method, points in (("supernet", 4), ("baseline-lora4", 2)):
        done = json.loads((out / "hparams" / "digits" / method / "done.json").read_text())
        assert len(done["grid"]) == points and done["lr"] in (1.0e-4, 5.0e-3)
        assert done["val_acc"] == max(p["val_acc"] for p in done["grid"])
        winners[method] = done["lr"]
        if method == "supernet":  # every lr with every LoRA multiplier
            assert sorted((p["lr"], p["module_lr"]["lora"]) for p in done["grid"]) == [
                (1.0e-4, 1.0),
                (1.0e-4, 4.0),
                (5.0e-3, 1.0),
                (5.0e-3, 4.0),
            ]
            lora_scale = done["module_lr"]["lora"]
    _, runs = mlflow_runs(out, "hp")

    def run_of(stage, label=None):
        return parent_run(runs, stage, **({"label": label} if label else {}))

    # The searched winner's own sweep ran after the search, on the subnet the search chose.
    assert "== hparams (searched subnets): 1 of 1 sweeps to run, 4 points each" in log
    own = json.loads((sweeps / "searched-rank1-seed0" / "done.json").read_text())
    found = json.loads((out / "search" / "digits-seed0" / "done.json").read_text())
    assert own["subnet"] == found["top"][0]["subnet"] and len(own["grid"]) == 4
    assert own["val_acc"] == max(p["val_acc"] for p in own["grid"])
    assert float(run_of("supernet").data.params["lr"]) == winners["supernet"]
    assert float(run_of("retrain", "rank1").data.params["lr"]) == own["lr"]
    assert float(run_of("retrain", "baseline-lora4").data.params["lr"]) == winners["baseline-lora4"]
    assert run_of("hparams", "supernet").data.params["chosen_lr"] == str(winners["supernet"])
    assert run_of("hparams", "searched-rank1-seed0").data.params["chosen_lr"] == str(own["lr"])
    retrained = json.loads((out / "retrain" / "digits-seed0" / "rank1" / "done.json").read_text())
    assert retrained["lr"] == own["lr"]
    # the swept LoRA multipliers reach the supernet and the searched subnet's retraining
    assert float(run_of("supernet").data.params["module_lr.lora"]) == lora_scale
    assert (
        float(run_of("retrain", "rank1").data.params["module_lr.lora"])
        == (own["module_lr"]["lora"])
    )
    assert "module_lr.lora" not in run_of("retrain", "baseline-lora4").data.params
    assert float(run_of("hparams", "supernet").data.params["chosen_module_lr.lora"]) == lora_scale


def test_searched_subnets_retrain_at_their_own_sweeps_rates(tmp_path):
    """With hparams.sweep_searched a searched subnet retrains at its own sweep's winner, never
    the supernet's; without it, at the supernet's (NOAH's recipe); a baseline at its own."""
    from nas.pipeline import rates
    from nas.spec.experiment import load_spec

    base = {
        "name": "rates",
        "datasets": [{"name": "digits", "format": "mini-vtab"}],
        "backbone": "vit_fmnist",
        "space": "tiny_cpu",
        "seeds": [0, 1],
        "output": str(tmp_path / "out"),
        "stages": {"hparams": {"enabled": True}},
    }
    for method, lr in (
        ("supernet", 1e-3),
        ("baseline-b", 2e-3),
        ("searched-rank1-seed0", 3e-3),
        ("searched-rank1-seed1", 4e-3),
    ):
        folder = tmp_path / "out" / "hparams" / "digits" / method
        folder.mkdir(parents=True)
        (folder / "done.json").write_text(json.dumps({"lr": lr, "weight_decay": 0.0}))
    path = tmp_path / "s.yaml"
    expected = {False: (1e-3, 1e-3), True: (3e-3, 4e-3)}
    for sweep_searched, (seed0, seed1) in expected.items():
        spec_doc = {**base, "stages": {"hparams": {"enabled": True}}}
        spec_doc["stages"]["hparams"]["sweep_searched"] = sweep_searched
        path.write_text(yaml.safe_dump(spec_doc))
        spec = load_spec(path, check_data=False)

        def lr(label, role, seed, spec=spec):
            method = rates.retrain_method(spec, label, role, seed)
            return rates.tuned(spec, "digits", method).lr

        assert (lr("rank1", "searched", 0), lr("rank1", "searched", 1)) == (seed0, seed1)
        assert lr("baseline-b", "baseline", 0) == 2e-3


def test_a_failing_trial_is_retried_then_reported_by_name(tmp_path, small_mini_vtab):
    """A learning rate that makes the loss NaN: the supernet trial fails on every retry, and
    the run stops with one message naming the dataset, the seed and the error."""
    spec = {
        "name": "nan",
        "datasets": [{"name": "digits", "format": "mini-vtab", "root": str(small_mini_vtab)}],
        "backbone": "vit_fmnist",
        "space": "tiny_cpu",
        "stages": {
            "supernet": {"epochs": 1, "lr": 1.0e30, "warmup_epochs": 0},
            "search": {"algorithm": "random", "options": {"num_candidates": 2}},
            "retrain": {"epochs": 1, "warmup_epochs": 0},
        },
    }
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc, tmpdir = start(path, tmp_path / "out", small_mini_vtab)
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        stop(proc, tmpdir)
    assert proc.returncode == 2, out[-3000:]
    assert "nas: error: supernet+search: 1 trial(s) failed after 2 retries:" in out
    assert "digits seed 0: FloatingPointError: loss is nan" in out
    for attempt in (1, 2):  # each retry is said, with its error, not hidden
        assert (
            f"nas: supernet+search trial digits seed 0 failed (attempt {attempt} of 3), "
            "retrying: " in out
        ), out[-3000:]
    assert not (tmp_path / "out" / "supernet" / "digits-seed0" / "done.json").exists()


@pytest.mark.xdist_group("pipeline")  # one uninterrupted run
def test_nas_report_command(uninterrupted, tmp_path):
    """`nas report` on the output folder and on the MLflow store print the same table, and
    --markdown writes it; a folder without results gets one clear line."""
    nas = [sys.executable, "-m", "nas", "report"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    results = json.loads((uninterrupted / "results.json").read_text())
    by_folder = subprocess.run(
        [*nas, str(uninterrupted), "--markdown", str(tmp_path / "r.md")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    by_store = subprocess.run(
        [*nas, f"sqlite:///{uninterrupted / 'mlflow.db'}", "--experiment", "ci"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    folder, store = by_folder.stdout, by_store.stdout
    assert folder == store
    # the UI link, the same from both, on stderr: stdout is the table alone
    assert by_folder.stderr == by_store.stderr
    assert "MLflow UI, the retrained models side by side: mlflow ui --backend-store-uri " in (
        by_folder.stderr
    )
    assert (tmp_path / "r.md").read_text().strip() == folder.strip()
    for dataset, acc in results["per_dataset"].items():
        assert f"- {dataset}: {acc:.4f}" in folder.splitlines()
    empty = subprocess.run([*nas, str(tmp_path)], capture_output=True, text=True, env=env)
    assert empty.returncode == 2
    assert empty.stderr.strip().splitlines() == [
        f"nas: error: {tmp_path / 'results.json'}: no results yet (has `nas run` finished in "
        f"{tmp_path}?)"
    ]
