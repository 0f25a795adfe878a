"""Retrained models as MLflow LoggedModels (issue 24): linked to their retrain run, with its
params and final metrics, loadable with ``mlflow.pyfunc.load_model("models:/<id>")`` from the
tracking store, classifying a uint8 batch (and image files) as the run scored its test split."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from nas.data.decode import decode_split
from nas.pipeline import context, layout, retrain
from nas.pipeline.tasks import RetrainTask
from nas.spec.experiment import load_spec
from nas.tracking import logged_model as mlflow_model
from nas.tracking.logged_model import images_for, register_winners
from tests.conftest import ENV, free_port

# One retraining shared by every test here: under pytest-xdist they go to one worker.
pytestmark = pytest.mark.xdist_group("logged_models")


def retrain_task(path, spec, seed: int, label: str, role: str, subnet, val_acc=None):
    return RetrainTask(
        spec=str(path),
        spec_abs=str(path),
        output=str(spec.output),
        dataset="digits",
        seed=seed,
        label=label,
        subnet=subnet,
        role=role,
        val_acc=val_acc,
    )


@pytest.fixture(scope="module")
def retrained(tmp_path_factory, small_mini_vtab):
    """One LoRA baseline on digits retrained (1 epoch) by the retrain stage's own code; the
    path and spec, for more."""
    tmp = tmp_path_factory.mktemp("logged")
    spec_doc = {
        "name": "logged",
        "datasets": [{"name": "digits", "format": "mini-vtab", "root": str(small_mini_vtab)}],
        "backbone": "vit_fmnist",
        "space": "tiny_cpu",
        "seeds": [0, 1],
        "output": str(tmp / "out"),
        "stages": {"retrain": {"epochs": 1, "warmup_epochs": 0, "lr": 5.0e-3}},
    }
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_doc))
    spec = load_spec(path)
    lora2 = {"lora": {"depth": 2, "dims": 2}}
    task = retrain_task(path, spec, 0, "baseline-lora2", "baseline", lora2)
    # system metrics every second (default 5 s: longer than this 1-epoch training)
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
    import logging

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    said: list[str] = []
    keep = Keep(logging.WARNING)
    logging.getLogger("mlflow").addHandler(keep)
    import warnings

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            row = retrain.run_retrain(task)
        said += [str(w.message) for w in caught if "mlflow" in w.filename]
    finally:
        del os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"]
        logging.getLogger("mlflow").removeHandler(keep)
    (tmp / "mlflow-warnings.json").write_text(json.dumps(said))
    return spec, task, row


def test_a_retrained_model_is_a_logged_model_of_its_run(retrained):
    spec, task, row = retrained
    client = mlflow.MlflowClient(spec.tracking_uri)
    model = client.get_logged_model(row["mlflow_model_id"])
    assert model.source_run_id == row["mlflow_run_id"]
    assert model.name == "digits-seed0-baseline-lora2"
    assert model.tags["nas.label"] == "baseline-lora2" and model.tags["nas.dataset"] == "digits"
    run = client.get_run(row["mlflow_run_id"])
    assert model.params == run.data.params  # the subnet, its learning rate, its data
    metrics = {m.key: m.value for m in model.metrics}
    assert metrics["test_acc"] == row["test_acc"]
    assert metrics["params"] == row["params"] and metrics["added_flops"] == row["added_flops"]
    # MLflow's own system metrics, sampled while it trained: the run's, not the model's
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
        run.data.metrics
    )
    assert not [k for k in metrics if k.startswith("system/")], sorted(metrics)
    # logged with its signature: MLflow warned of nothing (it warns when it must infer one)
    said = json.loads((Path(task.spec).parent / "mlflow-warnings.json").read_text())
    assert not [w for w in said if "signature" in w or "input example" in w], said
    assert {"test_acc", "params", "added_flops"} <= set(metrics)
    # the run lists it among its outputs (the runs table's Models column)
    assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
    # run again (a stopped trial's rerun after its done.json is lost): no second model
    (spec.output / "retrain" / "digits-seed0" / "baseline-lora2" / "done.json").unlink()
    again = retrain.run_retrain(task)
    assert again["mlflow_model_id"] == model.model_id
    experiment = client.get_experiment_by_name("logged").experiment_id
    assert [m.model_id for m in client.search_logged_models([experiment])] == [model.model_id]


def test_a_run_lists_the_splits_it_saw_as_dataset_inputs(retrained):
    """The runs table's Datasets column: each split the run trained or scored on, named
    <dataset>/<split>, its digest the start of the content hash the run records as a param,
    its context the split; logged once however often the trial ran."""
    spec, _, row = retrained
    run = mlflow.MlflowClient(spec.tracking_uri).get_run(row["mlflow_run_id"])
    seen = {
        d.dataset.name: (d.dataset.digest, {t.key: t.value for t in d.tags})
        for d in run.inputs.dataset_inputs
    }
    assert len(run.inputs.dataset_inputs) == 2  # not one more per rerun
    params = run.data.params
    assert seen == {
        f"digits/{split}": (
            params[f"data.{split}.sha256"][:16],
            {"mlflow.data.context": split},
        )
        for split in ("trainval", "test")
    }


def test_pyfunc_loads_from_the_store_and_classifies_images(retrained, small_mini_vtab):
    spec, _, row = retrained
    mlflow.set_tracking_uri(spec.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{row['mlflow_model_id']}")
    splits = context.read_splits(spec, spec.datasets[0])
    g = spec.backbone.geometry()
    test = decode_split(splits["test"], g.image_size, g.in_chans)
    batch = test.images.numpy().transpose(0, 2, 3, 1)  # (N, H, W, C) uint8, as users hold them
    assert batch.dtype == np.uint8
    out = model.predict(batch)
    assert list(out.columns) == ["class", "class_name", "probabilities"]
    accuracy = float((out["class"].to_numpy() == test.labels.numpy()).mean())
    assert accuracy == pytest.approx(row["test_acc"], abs=1e-9)  # as the run scored its test
    assert out["class_name"][0] == test.class_names[out["class"][0]]
    probs = np.array(out["probabilities"].tolist())
    assert probs.shape == (len(test), 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    # The signature says what it takes: uint8 (N, H, W, C) of the model's size.
    schema = model.metadata.get_input_schema().inputs[0]
    assert (schema.type, schema.shape) == (np.dtype(np.uint8), (-1, *batch.shape[1:]))
    assert [c.name for c in model.metadata.get_output_schema().inputs] == list(out.columns)
    # image files, the (N, H, W) greyscale form and other sizes go through images_for
    files = [str(e.path) for e in splits["test"].entries[:8]]
    by_path = model.predict(images_for(model, files))
    assert by_path["class"].tolist() == out["class"][:8].tolist()
    grey = images_for(model, batch[:4, :, :, 0])
    assert model.predict(grey)["class"].tolist() == out["class"][:4].tolist()
    # anything else is refused, never read as something it is not: floats in [0, 1] are
    # not taken for pixel values of 0 and 1
    with pytest.raises(
        Exception, match="dtype of input float32 does not match expected dtype uint8"
    ):
        model.predict(batch[:2].astype(np.float32) / 255.5)
    with pytest.raises(Exception, match="does not match expected shape"):
        model.predict(np.zeros((2, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="whole numbers from 0 to 255"):
        images_for(model, batch[:2].astype(np.float32) / 255.5)
    # an empty batch: an empty answer
    empty = model.predict(batch[:0])
    assert len(empty) == 0 and list(empty.columns) == list(out.columns)


def test_winners_are_registered_with_the_best_validated_as_champion_and_served(
    retrained, tmp_path, monkeypatch
):
    """Two seeds' searched winners become versions of `<experiment>-digits`; the alias
    `champion` goes to the one with the higher validation accuracy; registering again adds
    nothing; `mlflow models serve` serves the champion on 127.0.0.1 and answers a REST call
    with the same classes as the model loaded in this process."""
    spec, task, _ = retrained
    path = Path(task.spec)
    lora = {"lora": {"depth": 6, "dims": 2}}
    rows = [
        retrain.run_retrain(retrain_task(path, spec, seed, "rank1", "searched", lora, val))
        for seed, val in ((0, 0.5), (1, 0.7))
    ]
    # as in `nas run`'s driver: no process-wide tracking URI, whatever the working directory
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(None)
    uris = register_winners(spec.tracking_uri, "logged", rows)
    assert uris == {"digits": "models:/logged-digits@champion"}
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    client = mlflow.MlflowClient(spec.tracking_uri)
    versions = client.search_model_versions("name = 'logged-digits'")
    assert sorted(v.tags["nas.seed"] for v in versions) == ["0", "1"]
    champion = client.get_model_version_by_alias("logged-digits", "champion")
    assert champion.tags["nas.model_id"] == rows[1]["mlflow_model_id"]  # val 0.7, not test
    # each version linked to its LoggedModel both ways, as mlflow.register_model links them
    # (MLflow 3.17's SQL registry keeps no ModelVersion.model_id: it reads back None)
    for v in versions:
        model_id = v.tags["nas.model_id"]
        assert v.source == f"models:/{model_id}"
        listed = json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"])
        assert listed == [{"name": "logged-digits", "version": str(v.version)}]
    register_winners(spec.tracking_uri, "logged", rows)
    assert len(client.search_model_versions("name = 'logged-digits'")) == 2

    splits = context.read_splits(spec, spec.datasets[0])
    g = spec.backbone.geometry()
    test = decode_split(splits["test"], g.image_size, g.in_chans)
    batch = test.images[:16].numpy().transpose(0, 2, 3, 1)
    mlflow.set_tracking_uri(spec.tracking_uri)
    want = mlflow.pyfunc.load_model(uris["digits"]).predict(batch)["class"].tolist()
    port = free_port()
    env = {**os.environ, **ENV, "MLFLOW_TRACKING_URI": spec.tracking_uri}
    # the server runs `uvicorn` from PATH: this venv's, as an activated venv would give it
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uris["digits"]]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=(tmp_path / "serve.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
                assert time.time() < deadline, "mlflow models serve did not start"
                time.sleep(0.5)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": batch.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    predictions = answer["predictions"]
    assert [p["class"] for p in predictions] == want
    assert all(len(p["probabilities"]) == 10 for p in predictions)


def test_the_chosen_candidate_is_tagged_with_why_it_won_a_tie(tmp_path):
    from nas.pipeline.subnet_search import tag_chosen
    from nas.tracking.runs import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", "ties")
    parent = tracker.run("search", {"stage": "search"})
    scores = {"a": 0.93, "b": 0.93, "c": 0.90}  # a ranked before b: the cheaper
    runs = {k: tracker.run(f"cand {k}", {"candidate": k}, parent=parent) for k in scores}
    ranking = [{"key": k, "score": v} for k, v in scores.items()]
    found = tag_chosen(tracker, parent, ranking, top_k=2, cost="params")
    assert found == runs
    tags = {k: tracker.client.get_run(r).data.tags for k, r in runs.items()}
    assert tags["a"]["nas.chosen"] == "rank1" and tags["b"]["nas.chosen"] == "rank2"
    assert "nas.chosen" not in tags["c"]
    assert tags["a"]["nas.chosen_why"] == (
        "tied at val_acc 0.9300 with 1 other candidate(s); ranked first for the lowest params "
        "among them (then the earliest evaluated)"
    )
    assert "nas.chosen_why" not in tags["b"]
    # no tie, no explanation
    tag_chosen(tracker, parent, ranking[1:], top_k=1, cost="params")
    assert "nas.chosen_why" not in tracker.client.get_run(runs["b"]).data.tags


def test_a_moved_or_copied_run_folder_reads_its_own_artifacts(retrained, tmp_path, capsys):
    """A run folder's sqlite store records absolute artifact locations: after a copy, `nas
    relocate` points the copy's store at the copy's artifacts (the original made unreadable
    meanwhile, so nothing can come from it) and gives it its own output id; after a move the
    id stays and the store follows."""
    from nas.cli.main import main
    from nas.pipeline.layout import output_id

    spec, _, row = retrained
    original = spec.output
    first_id = output_id(original)
    copy = tmp_path / "copied"
    shutil.copytree(original, copy)
    assert main(["relocate", str(copy)]) == 0
    said = capsys.readouterr().out
    assert f"is a copy of {original}" in said and "artifact location(s)" in said
    hidden = original.with_name("hidden")
    original.rename(hidden)
    try:

        def loads_from(folder: Path) -> None:
            uri = f"sqlite:///{folder / 'mlflow.db'}"
            client = mlflow.MlflowClient(uri)
            run = client.get_run(row["mlflow_run_id"])
            assert run.info.artifact_uri.startswith(f"file://{folder}/")
            model = client.get_logged_model(row["mlflow_model_id"])
            assert model.artifact_location.startswith(f"file://{folder}/")
            with mlflow_model.global_tracking_uri(uri):
                loaded = mlflow.pyfunc.load_model(f"models:/{row['mlflow_model_id']}")
            shape = loaded.metadata.get_input_schema().inputs[0].shape
            images = np.zeros((2, *shape[1:]), dtype=np.uint8)
            assert len(loaded.predict(images)) == 2

        loads_from(copy)
        layout._IDS.clear()
        assert output_id(copy) != first_id

        moved = tmp_path / "moved"
        hidden.rename(moved)
        assert main(["relocate", str(moved)]) == 0
        assert f"was moved from {original}" in capsys.readouterr().out
        loads_from(moved)
        layout._IDS.clear()
        assert output_id(moved) == first_id
        moved.rename(hidden)
    finally:
        hidden.rename(original)
        main(["relocate", str(original)])


def test_registered_names_of_two_experiments_never_collide():
    """Names the registry cannot hold are made safe; where that changed a name, a hash of the
    original keeps two experiments whose names differ only in such characters apart."""
    from nas.tracking.logged_model import registered_name

    assert registered_name("quickstart", "digits") == "quickstart-digits"
    a, b = registered_name("my exp", "digits"), registered_name("my/exp", "digits")
    assert a != b and a.startswith("my-exp-digits-") and b.startswith("my-exp-digits-")
    assert registered_name("my exp", "digits") == a  # the same experiment, the same model
