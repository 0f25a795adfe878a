"""Two output folders of one spec on one real MLflow server never touch each other's records:
each makes its own runs (tagged with its output), a stop and a rerun of one continue only its
own, each results.json points at its own runs and models, and `nas report` tells them apart.
A moved folder keeps its runs; a copied one gets an identity of its own."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from nas.core.errors import NasError
from nas.pipeline.layout import claim_output, output_id
from tests.conftest import REPO
from tests.test_pipeline import kill_when, run_to_end

SPEC = {
    "name": "same",
    "datasets": [{"name": "digits", "format": "mini-vtab"}],
    "backbone": "vit_fmnist",
    "space": "tiny_cpu",
    "seeds": [0],
    "resources": {"cpus": 1, "gpus": 0},
    "stages": {
        "supernet": {"epochs": 3, "batch_size": 64, "lr": 5.0e-3, "warmup_epochs": 0},
        "search": {
            "algorithm": "evolution",
            "options": dict(generations=2, population=6, top_k=2, mutations=2, crossovers=2),
        },
        "retrain": {"top_k": 1, "epochs": 1, "lr": 5.0e-3, "warmup_epochs": 0},
    },
}


def runs_of(client: MlflowClient, experiment: str) -> dict[str, object]:
    exp = client.get_experiment_by_name(experiment)
    return {r.info.run_id: r for r in client.search_runs([exp.experiment_id], max_results=5000)}


def history(client: MlflowClient, run) -> dict[str, int]:
    return {k: len(client.get_metric_history(run.info.run_id, k)) for k in run.data.metrics}


def results_ids(output: Path) -> tuple[set[str], set[str]]:
    rows = json.loads((output / "results.json").read_text())["rows"]
    return {r["mlflow_run_id"] for r in rows}, {r["mlflow_model_id"] for r in rows}


def test_two_outputs_of_one_spec_on_one_server_keep_their_own_records(
    tmp_path, small_mini_vtab, mlflow_server
):
    spec = {
        **SPEC,
        "datasets": [{**d, "root": str(small_mini_vtab)} for d in SPEC["datasets"]],
        "mlflow": {"tracking_uri": mlflow_server, "experiment": "same"},
    }
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    first, second = tmp_path / "first", tmp_path / "second"
    client = MlflowClient(mlflow_server)

    run_to_end(spec_path, first, small_mini_vtab)
    before = runs_of(client, "same")
    first_id = output_id(first)
    assert {r.data.tags["nas.output_id"] for r in before.values()} == {first_id}
    assert {r.data.tags["nas.output"] for r in before.values()} == {str(first)}
    histories = {rid: history(client, r) for rid, r in before.items()}

    # The second output is stopped in its supernet's training, then continued.
    state = second / "supernet" / "digits-seed0" / "state.pt"
    kill_when(spec_path, second, small_mini_vtab, state.is_file)
    run_to_end(spec_path, second, small_mini_vtab)
    after = runs_of(client, "same")
    second_id = output_id(second)
    assert second_id != first_id

    # The first's runs: the same runs, untouched (status, end, every metric's history).
    for rid, run in before.items():
        now = after[rid]
        assert now.data.tags["nas.output_id"] == first_id
        assert (now.info.status, now.info.end_time) == (run.info.status, run.info.end_time)
        assert history(client, now) == histories[rid]
    # The second's: runs of its own, one per stage run, each found again after the kill.
    own = {rid: r for rid, r in after.items() if rid not in before}
    assert {r.data.tags["nas.output_id"] for r in own.values()} == {second_id}

    def stage_runs(runs: dict) -> Counter:
        tags = [r.data.tags for r in runs.values()]
        return Counter(t["nas.stage"] for t in tags if "mlflow.parentRunId" not in t)

    assert stage_runs(own) == stage_runs(before)
    supernet = next(r for r in own.values() if r.data.tags["nas.stage"] == "supernet")
    assert supernet.info.status == "FINISHED"
    assert len(client.get_metric_history(supernet.info.run_id, "train_loss")) == 3

    # Each results.json points at its own runs and models.
    for output, runs in ((first, before), (second, own)):
        run_ids, model_ids = results_ids(output)
        assert run_ids <= set(runs)
        for model_id in model_ids:
            assert client.get_logged_model(model_id).source_run_id in runs

    # `nas report` on the server: one error naming both folders, then each by --output.
    def report(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "nas", "report", mlflow_server, "--experiment", "same", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
        )

    both = report()
    assert both.returncode != 0
    assert str(first) in both.stderr and str(second) in both.stderr
    assert "--output" in both.stderr and "Traceback" not in both.stderr
    for output in (first, second):
        one = report("--output", str(output))
        assert one.returncode == 0, one.stderr
        rows = json.loads((output / "results.json").read_text())["rows"]
        # The same spec and seed give the same numbers: what tells the two apart is that
        # each table holds its own folder's rows only, not both folders'.
        listed = [line for line in one.stdout.splitlines() if line.startswith("| digits")]
        assert len(listed) == len(rows) == 1
        assert f"{rows[0]['test_acc']:.4f}" in listed[0]
        # the UI page of this folder's retrained models: a view saved on the experiment,
        # its filter naming this folder, the winners first, the scores as columns
        link = re.search(r"MLflow UI, the retrained models side by side: (\S+)", one.stderr)
        assert link and link.group(1).startswith(f"{mlflow_server}/#/experiments/")
        key = link.group(1).split("viewStateShareKey=")[1]
        experiment = client.get_experiment_by_name("same")
        view = json.loads(experiment.tags[f"mlflow.sharedViewState.{key}"])
        assert f"tags.`nas.output_id` = '{output_id(output)}'" in view["searchFilter"]
        assert view["orderByKey"] == "params.`role`" and view["orderByAsc"] is False
        assert view["selectedColumns"][:4] == [
            "metrics.`test_acc`", "metrics.`val_acc`", "metrics.`params`", "metrics.`added_flops`"
        ]  # fmt: skip
        shown = client.search_runs([experiment.experiment_id], view["searchFilter"])
        assert {r.info.run_id for r in shown} == {rows[0]["mlflow_run_id"]}
        # and the page of its stage runs: every run of this folder but the candidates
        link = re.search(r"MLflow UI, every stage run \(candidates left out\): (\S+)", one.stderr)
        assert link, one.stderr
        view = json.loads(experiment.tags[f"mlflow.sharedViewState.{link.group(1).split('=')[-1]}"])
        shown = client.search_runs([experiment.experiment_id], view["searchFilter"])
        folder = {r.info.run_id: r for r in runs_of(client, "same").values()
                  if r.data.tags["nas.output_id"] == output_id(output)}  # fmt: skip
        candidates = {rid for rid, r in folder.items() if "nas.candidate" in r.data.tags}
        assert len(candidates) >= 6
        assert {r.info.run_id for r in shown} == set(folder) - candidates
        assert {r.data.tags["nas.stage"] for r in shown} >= {"supernet", "search", "retrain"}


def test_a_moved_folder_keeps_its_id_and_a_copy_gets_its_own(tmp_path):
    a = tmp_path / "a"
    first = output_id(a)
    assert output_id(a) == first and claim_output(a) is None

    b = tmp_path / "b"
    a.rename(b)
    news = claim_output(b)
    assert news is not None and "moved from" in news and output_id(b) == first

    c = tmp_path / "c"
    subprocess.run(["cp", "-r", str(b), str(c)], check=True)
    news = claim_output(c)
    assert news is not None and "copy of" in news
    assert output_id(c) != first and output_id(b) == first
    assert claim_output(c) is None  # its path is its own from now on

    (c / "output_id.json").write_text("[]")
    from nas.pipeline import layout

    layout._IDS.clear()
    with pytest.raises(NasError, match=r"output_id\.json: damaged"):
        output_id(c)
