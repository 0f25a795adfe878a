"""README "Extending": a new dataset format and a new search algorithm are each one class and
one registration, with no change to the spec parser, the pipeline or the CLI. Each toy here is
registered in the live registry for one test only (monkeypatch restores it), then goes through
a spec, a space, a supernet training step and a search round."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from nas import factory
from nas.data import dataset_formats
from nas.data.dataset_formats import DatasetFormat
from nas.data.formats import Entry, Split, parse_list_file
from nas.errors import ConfigError
from nas.pipeline.context import load_splits, read_splits, supernet_steps
from nas.search import ALGORITHMS, Evaluated, SearchAlgorithm, make_search
from nas.spec import load_spec
from nas.subnet import Subnet
from trainers.train import TrainConfig, evaluate_candidates, train


class FlatLists(DatasetFormat):
    """A toy format: train.txt, val.txt and test.txt lists ('image label' lines)."""

    name = "flat-lists"

    def missing(self, folder: Path, variants) -> list[str]:
        return [f"{n}.txt" for n in ("train", "val", "test") if not (folder / f"{n}.txt").is_file()]

    def read_splits(self, folder: Path, *, shots=None, split_seed=None, duplicates="error"):
        splits = {}
        for name in ("train", "val", "test"):
            rows = parse_list_file(folder / f"{name}.txt", [folder], duplicates=duplicates)
            entries = [Entry(path, label, source) for path, label, source in rows]
            splits[name] = Split(name, entries, str(folder / f"{name}.txt"), 10, None)
        both = splits["train"].entries + splits["val"].entries
        splits["trainval"] = Split("trainval", both, str(folder), 10, None)
        return splits


class CheapestFirst(SearchAlgorithm):
    """A toy algorithm: random legal subnets, the cheapest of each batch proposed first."""

    name = "cheapest-first"

    def __init__(self, space, *, num_candidates: int = 8, seed: int = 0, cost: str = "params"):
        super().__init__(space, seed=seed, cost=cost)
        self.planned = num_candidates
        self.rng = random.Random(seed)

    @property
    def finished(self) -> bool:
        return len(self.history) >= self.planned

    def _propose(self) -> list[Subnet]:
        out: list[Subnet] = []
        while len(out) < self.planned - len(self.history):
            subnet = self.random_legal(self.rng, set(out))
            if subnet is None:
                break
            out.append(subnet)
        return sorted(out, key=self.cost)


def flat_copy(mini_vtab_data: Path, root: Path) -> Path:
    """The digits task as a flat-lists dataset: its images, lists renamed."""
    folder = root / "digits"
    folder.mkdir(parents=True)
    (folder / "images").symlink_to(mini_vtab_data / "digits" / "images")
    for new, old in (("train", "train800"), ("val", "val200"), ("test", "test")):
        (folder / f"{new}.txt").write_text((mini_vtab_data / "digits" / f"{old}.txt").read_text())
    return folder


def write_spec(tmp_path: Path, dataset: dict, search: dict) -> Path:
    doc = {
        "name": "toy",
        "datasets": [dataset],
        "backbone": "vit_fmnist",
        "space": "tiny_cpu",
        "output": str(tmp_path / "out"),
        "stages": {"search": search},
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def supernet_step_and_search(spec_path: Path) -> list[Evaluated]:
    """One epoch of supernet training on a few batches, then the spec's search, scored on val."""
    spec = load_spec(spec_path)
    ds = spec.datasets[0]
    data = load_splits(spec, ds, ("train", "val"))
    model = factory.supernet(spec.space, spec.backbone, data["train"], ds.key)
    mean, std = spec.backbone.normalisation()
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    cfg = TrainConfig(epochs=1, warmup_epochs=0)
    train(model, data["train"], cfg, mean=mean, std=std, sample_subnet=supernet_steps(spec))
    after = model.trainable_state_dict()
    assert any(not (before[k] == after[k]).all() for k in before), "the step trained nothing"
    algo = make_search(spec.search.algorithm, spec.space, seed=0, **spec.search.options)
    algo.run(lambda subnets: evaluate_candidates(model, subnets, data["val"], mean=mean, std=std))
    return algo.history


def test_a_new_dataset_format_is_one_class_and_one_registration(
    tmp_path, mini_vtab_data, monkeypatch
):
    monkeypatch.setitem(dataset_formats.FORMATS, FlatLists.name, FlatLists())
    root = tmp_path / "flat"
    folder = flat_copy(mini_vtab_data, root)
    dataset = {"name": "digits", "format": "flat-lists", "root": str(root)}
    path = write_spec(tmp_path, dataset, {"algorithm": "random", "options": {"num_candidates": 3}})
    spec = load_spec(path)
    ds = spec.datasets[0]
    assert ds.key == "digits" and ds.retrain_split == "trainval"  # the defaults it inherits
    splits = read_splits(spec, ds)
    assert [len(splits[n].entries) for n in ("train", "val", "test", "trainval")] == [
        800,
        200,
        200,
        1000,
    ]
    history = supernet_step_and_search(path)
    assert len(history) == 3 and all(0.0 <= e.score <= 1.0 for e in history)
    # its layout is checked at load, naming what is missing, as a shipped format's is
    (folder / "val.txt").unlink()
    with pytest.raises(ConfigError, match=r"lacks val\.txt \(the flat-lists layout\)"):
        load_spec(path)


def test_a_new_search_algorithm_is_one_class_and_one_registration(
    tmp_path, mini_vtab_data, monkeypatch
):
    monkeypatch.setitem(ALGORITHMS, CheapestFirst.name, CheapestFirst)
    dataset = {"name": "digits", "format": "mini-vtab", "root": str(mini_vtab_data)}
    search = {"algorithm": "cheapest-first", "options": {"num_candidates": 5}}
    history = supernet_step_and_search(write_spec(tmp_path, dataset, search))
    costs = [e.cost for e in history]
    assert len(history) == 5 and costs == sorted(costs)  # its own order, cheapest first
    # its options are read from its signature: a wrong one is refused at load
    bad = write_spec(tmp_path, dataset, {**search, "options": {"num_candidates": 0}})
    with pytest.raises(ConfigError, match=r"options\.num_candidates: expected an integer >= 1"):
        load_spec(bad)
