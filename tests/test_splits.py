"""Which split each stage trains on, per dataset format, as the protocols define them: VTAB-1k
retrains on train800val200, a few-shot protocol on its K shots alone (val serves the search
only), an ImageFolder on train + val. Every retraining records the split and its image count in
its result row and in its MLflow run."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest
import yaml

from nas.cli.main import main
from nas.pipeline import context, retrain
from nas.pipeline import subnet_search as search
from nas.pipeline.tasks import RetrainTask
from nas.spec.experiment import load_spec

# Its module-scoped fixtures run once: under pytest-xdist every test here goes to one worker.
pytestmark = pytest.mark.xdist_group("splits")

SHOTS = 2
CLASSES = 10  # digits


def write_formats(vtab_root: Path, root: Path) -> dict[str, dict]:
    """The digits task under ``vtab_root`` in each format: its VTAB-1k lists, an ImageFolder of
    the same images (train/val/test, one folder per class), and 2-shot few-shot lists written
    from it; each as a spec's dataset entry (without its name)."""
    vtab = Path(vtab_root) / "digits"
    for split, listing in (("train", "train800"), ("val", "val200"), ("test", "test")):
        for line in (vtab / f"{listing}.txt").read_text().splitlines():
            path, label = line.rsplit(" ", 1)
            target = root / "folders" / "digits" / split / f"c{int(label):02d}"
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(vtab / path, target / Path(path).name)
    few = root / "few" / "digits"
    args = ["data", "few-shot", str(root / "folders" / "digits" / "train"), "--out", str(few)]
    assert main([*args, "--shots", str(SHOTS), "--seeds", "0", "--val-per-class", "3"]) == 0
    return {
        "vtab": {"format": "vtab", "root": str(vtab_root)},
        "imagefolder": {"format": "imagefolder", "root": str(root / "folders")},
        "few-shot": {
            "format": "few-shot",
            "root": str(root / "few"),
            "shots": SHOTS,
            "split_seed": 0,
        },
    }


@pytest.fixture(scope="module")
def three_formats(tmp_path_factory, mini_vtab_data):
    """The digits task in each format (``write_formats``), at its full size."""
    return write_formats(mini_vtab_data, tmp_path_factory.mktemp("formats"))


def write_spec(tmp_path: Path, dataset: dict) -> Path:
    spec = {
        "name": "splits",
        "datasets": [{"name": "digits", **dataset}],
        "backbone": "vit_fmnist",
        "space": "tiny_cpu",
        "seeds": [0],
        "output": str(tmp_path / "out"),
        "stages": {
            "supernet": {"epochs": 1, "warmup_epochs": 0, "checkpoint_every": 1},
            "search": {"algorithm": "random", "options": {"num_candidates": 4, "batch_size": 4}},
            "retrain": {"epochs": 1, "warmup_epochs": 0, "lr": 5.0e-3},
        },
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize(
    "fmt, split, images",
    [
        ("vtab", "trainval", 1000),  # train800 + val200
        ("imagefolder", "trainval", 1000),
        ("few-shot", "train", SHOTS * CLASSES),  # the K shots alone, never the val list
    ],
)
def test_retraining_trains_on_the_protocols_split(tmp_path, three_formats, fmt, split, images):
    path = write_spec(tmp_path, three_formats[fmt])
    spec = load_spec(path)
    ds = spec.datasets[0]
    assert ds.retrain_split == split
    task = RetrainTask(
        spec=str(path),
        spec_abs=str(path),
        output=str(spec.output),
        dataset=ds.key,
        seed=0,
        label="lora2",
        subnet={"lora": {"depth": 2, "dims": 2}},
        role="baseline",
    )
    row = retrain.run_retrain(task)
    assert (row["train_split"], row["train_images"]) == (split, images)
    params = mlflow.MlflowClient(spec.tracking_uri).get_run(row["mlflow_run_id"]).data.params
    assert params["train_split"] == split and params["eval_split"] == "test"
    assert int(params["train_images"]) == images
    # the supernet trains on train alone in every format; the search scores on val
    search.run_supernet_and_search(task)
    client = mlflow.MlflowClient(spec.tracking_uri)
    experiment = client.get_experiment_by_name(spec.mlflow_experiment).experiment_id
    (run,) = client.search_runs([experiment], "tags.`nas.stage` = 'supernet'")
    supernet = run.data.params
    train_images = 800 if fmt != "few-shot" else SHOTS * CLASSES
    assert supernet["train_split"] == "train" and int(supernet["train_images"]) == train_images


def test_a_few_shot_spec_hashes_apart_from_its_old_protocol(tmp_path, three_formats):
    """The few-shot protocol changed (K shots, not K shots + val): its runs get a new spec hash,
    while the VTAB and ImageFolder hashes stay what they were."""
    few = load_spec(write_spec(tmp_path, three_formats["few-shot"]))
    assert few.to_data()["datasets"][0]["retrain_split"] == "train"
    vtab = load_spec(write_spec(tmp_path, three_formats["vtab"]))
    assert "retrain_split" not in vtab.to_data()["datasets"][0]


def test_an_imagefolder_split_missing_a_class_keeps_every_label(tmp_path, three_formats):
    """val and test take train's class list: with class c03 absent from test, c05's images
    are still label 5 (numbered per split, they would become 4 and score wrongly)."""
    root = Path(three_formats["imagefolder"]["root"])
    copy = tmp_path / "folders"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "digits" / "test" / "c03")
    spec = load_spec(write_spec(tmp_path, {"format": "imagefolder", "root": str(copy)}))
    splits = context.read_splits(spec, spec.datasets[0])
    labels = {e.path.parent.name: e.label for e in splits["test"].entries}
    assert labels["c05"] == 5 and "c03" not in labels
    assert splits["test"].num_classes == splits["train"].num_classes == CLASSES
