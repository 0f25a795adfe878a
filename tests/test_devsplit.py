"""The development test split (issue 37): mini-VTAB tasks whose source allows it gain
``devtest`` (1,000 images no other split, target or pretraining image holds), drawn after the
other splits so that those are what they were; ``test_split: devtest`` tests on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from nas.core.errors import ConfigError
from nas.core.yamlio import parse_yaml
from nas.data.decode import decode_split
from nas.data.hashing import image_fingerprints
from nas.data.lists import read_vtab
from nas.data.mini_vtab_base import DEV
from nas.pipeline.context import load_splits
from nas.pipeline.retrain import run_retrain
from nas.pipeline.tasks import RetrainTask
from nas.spec.experiment import load_spec, parse_spec

#: The splits' content hashes (first 16 hex digits) as prepared before devtest existed
#: (test_size 200, the conftest fixture's): adding devtest changed none of them.
BEFORE = {
    "digits": {"train": "2fe821d1388eedf7", "val": "1b81b755da0b1031",
               "trainval": "37fd690b6473e0ac", "test": "155a47d37db24bc4"},
    "dsprites_loc": {"train": "51ce132fe20de533", "val": "c98a6f8d57d2ecb0",
                     "trainval": "295963adf1435f14", "test": "faed5ea6bc6bcb3c"},
}  # fmt: skip


def test_devtest_is_new_images_and_leaves_the_other_splits_as_they_were(mini_vtab_data):
    manifest = json.loads((mini_vtab_data / "manifest.json").read_text())
    for task, splits in BEFORE.items():
        got = {s: v["sha256"][:16] for s, v in manifest["tasks"][task]["splits"].items()}
        assert {s: got[s] for s in splits} == splits
    assert "devtest" not in manifest["tasks"]["digits"]["splits"]  # its source is used up
    dev = manifest["tasks"]["dsprites_loc"]["splits"]["devtest"]
    assert dev["count"] == DEV and min(dev["per_class"]) >= DEV // 7 - 1  # balanced labels
    splits = read_vtab(mini_vtab_data / "dsprites_loc")
    prints = {}
    for name in ("train", "val", "test", "devtest"):
        images = decode_split(splits[name], 28, 1).images.numpy().astype(np.uint8)
        prints[name] = set(image_fingerprints(images[:, 0]).tolist())
    assert len(prints["devtest"]) == DEV
    assert not prints["devtest"] & (prints["train"] | prints["val"] | prints["test"])


def spec_text(name: str, test_split: str, root) -> str:
    return f"""
name: dev
datasets: [{{name: {name}, format: mini-vtab, root: {root}, test_split: {test_split}}}]
backbone: vit_fmnist
space: tiny_cpu
seeds: [0]
stages:
  search: {{enabled: false}}
  retrain:
    epochs: 1
    lr: 5.0e-3
    warmup_epochs: 0
    baselines: {{lora2: {{lora: {{depth: 2, dims: 2}}}}}}
"""


def test_test_split_is_checked_and_only_changes_the_hash_when_set(tmp_path, mini_vtab_data):
    with pytest.raises(
        ConfigError, match=r"datasets\[0\]\.test_split: mini-VTAB task digits has no"
    ):
        parse_spec(parse_yaml(spec_text("digits", "devtest", mini_vtab_data), "spec.yaml"))
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.test_split: .*one of: test, devtest"):
        parse_spec(parse_yaml(spec_text("digits", "dev", mini_vtab_data), "spec.yaml"))
    plain = parse_spec(parse_yaml(spec_text("dsprites_loc", "test", mini_vtab_data), "a.yaml"))
    text = spec_text("dsprites_loc", "test", mini_vtab_data).replace(", test_split: test", "")
    assert parse_spec(parse_yaml(text, "a.yaml")).hash() == plain.hash()
    dev = parse_spec(parse_yaml(spec_text("dsprites_loc", "devtest", mini_vtab_data), "a.yaml"))
    assert dev.hash() != plain.hash()


def test_a_retraining_with_test_split_devtest_tests_on_devtest(tmp_path, mini_vtab_data):
    (tmp_path / "spec.yaml").write_text(spec_text("dsprites_loc", "devtest", mini_vtab_data))
    spec = load_spec(tmp_path / "spec.yaml", output=tmp_path / "run")
    (ds,) = spec.datasets
    test = load_splits(spec, ds, ("test",))["test"]
    assert test.name == "devtest" and len(test) == DEV
    result = run_retrain(
        RetrainTask(
            spec=str(tmp_path / "spec.yaml"),
            spec_abs=str(tmp_path / "spec.yaml"),
            output=str(tmp_path / "run"),
            dataset="dsprites_loc",
            seed=0,
            label="baseline-lora2",
            role="baseline",
            subnet={"lora": {"depth": 2, "dims": 2}},
        )
    )
    run = MlflowClient(spec.tracking_uri).get_run(result["mlflow_run_id"])
    assert run.data.params["eval_split"] == "devtest"
    manifest = yaml.safe_load((mini_vtab_data / "manifest.json").read_text())
    expected = manifest["tasks"]["dsprites_loc"]["splits"]["devtest"]["sha256"]
    assert run.data.params["data.devtest.sha256"] == expected
    assert "data.test.sha256" not in run.data.params  # the reported test split is not read


def test_a_task_prepared_before_devtest_is_one_error_before_any_trial(tmp_path, mini_vtab_data):
    import shutil

    from nas.core.errors import NasError
    from nas.pipeline.driver import prepare_data

    root = tmp_path / "old"
    shutil.copytree(mini_vtab_data / "dsprites_loc", root / "dsprites_loc")
    (root / "dsprites_loc" / "devtest.txt").unlink()
    manifest = json.loads((mini_vtab_data / "manifest.json").read_text())
    del manifest["tasks"]["dsprites_loc"]["splits"]["devtest"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "spec.yaml").write_text(spec_text("dsprites_loc", "devtest", root))
    spec = load_spec(tmp_path / "spec.yaml", output=tmp_path / "run")
    with pytest.raises(NasError, match=r"has no devtest split .*prepare the task again"):
        prepare_data(spec)
