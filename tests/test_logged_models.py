"""Retrained models as MLflow LoggedModels (issue 24): linked to their retrain run, with its
params and final metrics, loadable with ``mlflow.pyfunc.load_model("models:/<id>")`` from the
tracking store, classifying a uint8 batch (and image files) as the run scored its test split."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import yaml

from nas.data.decode import decode_split
from nas.pipeline import context, retrain
from nas.pipeline.tasks import RetrainTask
from nas.spec import load_spec

# One retraining shared by every test here: under pytest-xdist they go to one worker.
pytestmark = pytest.mark.xdist_group("logged_models")


@pytest.fixture(scope="module")
def retrained(tmp_path_factory, mini_vtab_data):
    """One LoRA baseline on digits retrained (1 epoch) by the retrain stage's own code."""
    tmp = tmp_path_factory.mktemp("logged")
    spec_doc = {
        "name": "logged",
        "datasets": [{"name": "digits", "format": "mini-vtab", "root": str(mini_vtab_data)}],
        "backbone": "vit_fmnist",
        "space": "tiny_cpu",
        "output": str(tmp / "out"),
        "stages": {"retrain": {"epochs": 1, "warmup_epochs": 0, "lr": 5.0e-3}},
    }
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_doc))
    spec = load_spec(path)
    task = RetrainTask(
        spec=str(path),
        spec_abs=str(path),
        output=str(spec.output),
        dataset="digits",
        seed=0,
        label="baseline-lora2",
        subnet={"lora": {"depth": 2, "dims": 2}},
        role="baseline",
    )
    return spec, task, retrain.run_retrain(task)


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
    # the run lists it among its outputs (the runs table's Models column)
    assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
    # run again (a stopped trial's rerun after its done.json is lost): no second model
    (spec.output / "retrain" / "digits-seed0" / "baseline-lora2" / "done.json").unlink()
    again = retrain.run_retrain(task)
    assert again["mlflow_model_id"] == model.model_id
    experiment = client.get_experiment_by_name("logged").experiment_id
    assert len(client.search_logged_models([experiment])) == 1


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


def test_pyfunc_loads_from_the_store_and_classifies_images(retrained, mini_vtab_data):
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
    # image files give the same answers as their decoded pixels
    files = [str(e.path) for e in splits["test"].entries[:8]]
    by_path = model.predict(files)
    assert by_path["class"].tolist() == out["class"][:8].tolist()
    # the (N, H, W) greyscale form, and bad input with a message saying what is expected
    assert model.predict(batch[:4, :, :, 0])["class"].tolist() == out["class"][:4].tolist()
    with pytest.raises(Exception, match="whole numbers from 0 to 255"):
        model.predict(batch[:2].astype(np.float32) / 255.5)
    with pytest.raises(Exception, match=r"integer array \(N, H, W, C\)"):
        model.predict(np.zeros((2, 3), dtype=np.uint8))
