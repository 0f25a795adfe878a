"""The CLIP quickstart's path end to end: `nas run` on the offline CLIP through real Ray and a
real MLflow store, with the zero-shot, CoOp and UPT baselines, and a winner reloaded from
MLflow alone."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import yaml

from nas import families
from nas.core.errors import NasError
from nas.data.decode import decode_split
from nas.data.lists import read_vtab
from nas.families import build_prompted
from nas.families.clip.model import PromptedCLIP
from nas.spec.experiment import load_spec
from nas.training.evaluate import evaluate
from tests.test_pipeline import mlflow_runs, parent_run, run_to_end

# Its module-scoped fixtures run once: under pytest-xdist every test here goes to one worker.
pytestmark = pytest.mark.xdist_group("clip_pipeline")

SPEC = {
    "name": "clip-ci",
    "datasets": [
        {"name": "digits", "format": "mini-vtab"},
        {"name": "dsprites_loc", "format": "mini-vtab"},
    ],
    "space": "clip_cpu",
    "seeds": [0],
    "resources": {"cpus": 1, "gpus": 0},
    "stages": {
        "supernet": {"epochs": 2, "batch_size": 64, "lr": 5.0e-3, "warmup_epochs": 0},
        "search": {"algorithm": "random", "options": {"num_candidates": 6, "batch_size": 6}},
        "retrain": {
            "top_k": 1,
            "epochs": 1,
            "lr": 5.0e-3,
            "warmup_epochs": 0,
            "baselines": {
                "zero_shot": {},
                "coop": {"upt": {"mode": "text", "n_ctx": 4}},
                "upt": {"upt": {"mode": "unified", "n_ctx": 4}},
            },
        },
    },
}


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory, small_mini_vtab):
    root = tmp_path_factory.mktemp("clip-pipeline")
    spec = {**SPEC, "datasets": [{**d, "root": str(small_mini_vtab)} for d in SPEC["datasets"]]}
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    run_to_end(root / "spec.yaml", root / "out", small_mini_vtab)
    return root / "out"


def test_clip_pipeline_end_to_end(clip_run, small_mini_vtab):
    client, runs = mlflow_runs(clip_run, "clip-ci")
    kinds = Counter(
        (r.data.tags.get("nas.stage"), "mlflow.parentRunId" in r.data.tags) for r in runs
    )
    assert kinds == {
        ("supernet", False): 2,
        ("search", False): 2,
        ("search", True): 2 * 6,
        ("retrain", False): 2 * 4,  # the winner and three baselines per dataset
    }
    assert all(r.info.status == "FINISHED" for r in runs)
    results = json.loads((clip_run / "results.json").read_text())
    rows = {(r["dataset"], r["label"]): r for r in results["rows"]}
    assert rows[("digits", "baseline-zero_shot")]["params"] == 0
    assert rows[("digits", "baseline-coop")]["params"] == 4 * 128
    assert all(r["head_params"] == 0 for r in results["rows"])

    # A winner reloads from MLflow alone (onto the CLIP it names) and reproduces its test score.
    winner = parent_run(runs, "retrain", label="baseline-upt", dataset="digits")
    local = client.download_artifacts(winner.info.run_id, "model", str(clip_run / "dl"))
    model = families.load(local).eval()  # whichever backbone: the folder names its CLIP
    assert isinstance(model, PromptedCLIP)
    assert model.class_names[:3] == ["zero", "one", "two"]
    test = decode_split(read_vtab(small_mini_vtab / "digits")["test"], 28, 1)
    mean, std = model.clip_spec.normalisation()
    assert abs(evaluate(model, test, mean=mean, std=std) - winner.data.metrics["test_acc"]) < 1e-9


def test_a_dataset_without_class_names_is_refused_for_clip(tmp_path, small_mini_vtab):
    import shutil

    from nas.pipeline.context import load_splits
    from nas.pipeline.preflight import check_class_names

    data = tmp_path / "data"
    shutil.copytree(small_mini_vtab / "digits", data / "digits")
    (data / "digits" / "classnames.txt").unlink()
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {**SPEC, "datasets": [{"name": "digits", "format": "vtab", "root": str(data)}]}
        )
    )
    spec = load_spec(spec_path, output=tmp_path / "out")
    # `nas run` refuses it before any trial starts ...
    with pytest.raises(NasError, match=r"dataset 'digits' has no class names \(.*classnames\.txt"):
        check_class_names(spec)
    # ... and a model is never built without them either.
    split = load_splits(spec, spec.datasets[0], ("train",))["train"]
    with pytest.raises(NasError, match=r"dataset 'digits' has no class names.*classnames\.txt"):
        build_prompted(spec.backbone, spec.space, split, dataset="digits")


@pytest.mark.parametrize("baseline", ["linear-probe", "full-finetune"])
def test_classifier_baselines_on_a_clip_are_refused(tmp_path, baseline):
    spec = {**SPEC, "stages": {**SPEC["stages"], "retrain": {"baselines": {"b": baseline}}}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(NasError, match=r"an empty subnet \(\{\}\) is zero-shot classification"):
        load_spec(path)
