"""README "Extending": a new dataset format, search algorithm, prompt module kind and backbone
family are each a class or two and one registration, with no change to the spec parser, the
pipeline or the CLI.
Each toy here is registered in the live registry for one test only (monkeypatch restores it),
then goes through a spec, a space, a supernet training step and a search round."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F

from nas import families
from nas.core.errors import ConfigError, NasError
from nas.data import formats as dataset_formats
from nas.data.formats import DatasetFormat
from nas.data.lists import Entry, Split, parse_list_file
from nas.families import build_prompted
from nas.families.vit.model import PromptedViT
from nas.families.vit.spec import BackboneSpec, load_backbone
from nas.modules import REGISTRY
from nas.modules.base import LayeredModule
from nas.modules.options import Options
from nas.pipeline.context import load_splits, read_splits, supernet_steps
from nas.search import ALGORITHMS, Evaluated, SearchAlgorithm, make_search
from nas.space.backbones import FAMILIES, Family
from nas.space.cost import subnet_params
from nas.space.subnet import Subnet
from nas.spec.experiment import load_spec
from nas.training.evaluate import evaluate_candidates
from nas.training.train import TrainConfig, train


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


@dataclasses.dataclass(frozen=True)
class LowRankOptions(Options):
    """The toy's one option (``options: {init_std: ...}`` in a space): A's initial scale."""

    init_std: float = 0.02


class LowRankMLP(LayeredModule):
    """A toy module kind at a site no shipped kind uses (the input of each chosen block's fc2,
    the MLP's hidden units): ``x + (x A^T) B^T`` with A (dim x hidden) and B (hidden x dim), B
    starting at zero. Linear in ``x``, so it folds into fc2's weight: ``W (I + B A)``."""

    kind = "lowrank"
    sites = frozenset({"fc2.in"})
    mergeable = True
    Options = LowRankOptions
    slice_axes: ClassVar[dict[str, int | None]] = {"a": 0, "b": 1}

    @classmethod
    def layer_params(cls, dim: int, geometry) -> int:
        return 2 * geometry.mlp_hidden * dim

    @classmethod
    def flops(cls, choice, geometry, seq_lens, merged: bool) -> int:
        if merged:
            return 0
        return sum(4 * seq_lens[i] * geometry.mlp_hidden * dim for i, dim in enumerate(choice))

    def make_layer(self, dim: int) -> nn.Module:
        layer = nn.Module()
        layer.a = nn.Parameter(torch.randn(dim, self.geometry.mlp_hidden) * self.options.init_std)
        layer.b = nn.Parameter(torch.zeros(self.geometry.mlp_hidden, dim))
        return layer

    def site_in(self, layer: int, op: str, x: torch.Tensor) -> torch.Tensor:
        dim = self.dim(layer)
        if dim == 0:
            return x
        w = self.sliced(layer, dim)
        return x + F.linear(F.linear(x, w["a"]), w["b"])

    def merge_into(self, operation, *, inputs: bool) -> None:
        if not inputs:
            return  # it acts at an input only
        for layer, dim in enumerate(self.active):
            if dim:
                w, fc2 = self.sliced(layer, dim), operation(layer, "fc2")
                fc2.weight.add_(fc2.weight @ (w["b"] @ w["a"]))


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


class _Classes:
    """What the model builders read of a split: its class count (and names, none here)."""

    def __init__(self, n: int) -> None:
        self.num_classes, self.class_names = n, None


def flat_copy(mini_vtab_data: Path, root: Path) -> Path:
    """The digits task as a flat-lists dataset: its images, lists renamed."""
    folder = root / "digits"
    folder.mkdir(parents=True)
    (folder / "images").symlink_to(mini_vtab_data / "digits" / "images")
    for new, old in (("train", "train800"), ("val", "val200"), ("test", "test")):
        (folder / f"{new}.txt").write_text((mini_vtab_data / "digits" / f"{old}.txt").read_text())
    return folder


def write_spec(tmp_path: Path, dataset: dict, search: dict, space: str = "tiny_cpu") -> Path:
    doc = {
        "name": "toy",
        "datasets": [dataset],
        "backbone": "vit_fmnist",
        "space": space,
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
    model = build_prompted(spec.backbone, spec.space, data["train"], dataset=ds.key)
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


def test_a_new_module_kind_is_one_class_and_one_registration(tmp_path, mini_vtab_data, monkeypatch):
    monkeypatch.setitem(REGISTRY, LowRankMLP.kind, LowRankMLP)
    space = {
        "name": "toy-space",
        "backbone": "vit_fmnist",
        "modules": {
            "lowrank": {
                "dims": [0, 2, 4],
                "depths": [2, 6],
                "max_dim": 4,
                "options": {"init_std": 0.05},
            },
            "lora": {"dims": [0, 2], "depths": [2], "max_dim": 2},
            "ia3": {"targets": ["none", "fc2.in"], "depths": [6]},
        },
        "budget": {"params": {"max": 20_000}},
    }
    (tmp_path / "toy_space.yaml").write_text(yaml.safe_dump(space))
    dataset = {"name": "digits", "format": "mini-vtab", "root": str(mini_vtab_data)}
    search = {"algorithm": "random", "options": {"num_candidates": 4}}
    spec_path = write_spec(tmp_path, dataset, search, space=str(tmp_path / "toy_space.yaml"))
    spec = load_spec(spec_path)
    g = spec.space.geometry
    # its exact costs drive the space's counts and the budget
    # depth 2's choices are depth 6's with trailing zeros: 3^6 distinct choices
    assert spec.space.modules["lowrank"].count() == 3**6
    # its options are its frozen dataclass, read from the space's YAML
    assert spec.space.modules["lowrank"].options == LowRankOptions(init_std=0.05)
    subnet = Subnet({"lowrank": [4, 0, 2]})
    assert subnet_params(subnet, g) == 2 * g.mlp_hidden * 6 and spec.space.admits(subnet)
    history = supernet_step_and_search(spec_path)
    assert len(history) == 4 and all(e.cost <= 20_000 for e in history)
    # an exported subnet holds exactly its slices and computes what the supernet computed
    model = build_prompted(spec.backbone, spec.space, _Classes(10), dataset="digits")
    assert model.prompt_modules["lowrank"].options.init_std == 0.05
    model.set_subnet(subnet)
    torch.manual_seed(0)
    for param in model.trainable_parameters():  # B starts at zero: make the kind act
        param.data.normal_(0, 0.05)
    x = torch.randn(2, g.in_chans, 28, 28)
    with torch.no_grad():
        model.eval()
        alone = model.export()
        alone.eval()
        torch.testing.assert_close(alone(x), model(x))
        # its merge capability: folded into fc2, no module of it left, the same logits
        merged = model.export(merge=True).eval()
        assert "lowrank" not in merged.prompt_modules and not merged.tower.injector.used_sites()
        torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=1e-5)
        # beside IA3 at the same input (IA3 acts first: the layer computes W M M_ia3 x)
        model.set_subnet(Subnet({"lowrank": [4, 0, 2], "ia3": (8, 8, 8)}))
        both = model(x)
        torch.testing.assert_close(model.export(merge=True).eval()(x), both, atol=1e-5, rtol=1e-5)
        model.set_subnet(Subnet())
        assert not torch.allclose(model(x), alone(x))  # the kind changed the output
    assert alone.num_params()["modules"] == 2 * g.mlp_hidden * 6


def test_a_new_backbone_family_is_a_spec_a_model_class_and_one_registration(
    tmp_path, mini_vtab_data, monkeypatch
):
    """A toy family: timm ViT classifiers whose prompted model is a class of its own, with a
    saved-folder format of its own. A space names it as ``backbone: {toy: NAME}``; the pipeline's
    calls (supernet, search) and the generic loader reach it through the protocol alone."""

    class ToyPrompted(PromptedViT):
        FORMAT = "toy-prompted-subnet/1"  # its saved folders, for nas.families.load

    @dataclasses.dataclass(frozen=True)
    class ToySpec(BackboneSpec):
        family: ClassVar[str] = "toy"  # built by ToyPrompted.build (PromptedViT's)

    def load_toy(name):
        vit = load_backbone(name)
        return ToySpec(**{f.name: getattr(vit, f.name) for f in dataclasses.fields(vit)})

    # the one registration (restored after the test)
    monkeypatch.setitem(FAMILIES, "toy", Family("toy", load=load_toy, model=ToyPrompted))
    space = yaml.safe_load((Path("search_spaces") / "tiny_cpu.yaml").read_text())
    space["backbone"] = {"toy": "vit_fmnist"}
    (tmp_path / "toy_space.yaml").write_text(yaml.safe_dump(space))
    dataset = {"name": "digits", "format": "mini-vtab", "root": str(mini_vtab_data)}
    search = {"algorithm": "random", "options": {"num_candidates": 3}}
    spec_path = write_spec(tmp_path, dataset, search, space=str(tmp_path / "toy_space.yaml"))
    doc = yaml.safe_load(spec_path.read_text())
    del doc["backbone"]  # the space's family
    spec_path.write_text(yaml.safe_dump(doc))
    spec = load_spec(spec_path)
    assert isinstance(spec.backbone, ToySpec)
    assert len(supernet_step_and_search(spec_path)) == 3
    # the family's model, saved in its own format, comes back through the generic loader
    subnet = Subnet({"lora": [2, 2]})
    model = build_prompted(spec.backbone, spec.space, _Classes(10), subnet=subnet).eval()
    torch.manual_seed(0)
    for param in model.trainable_parameters():
        param.data.normal_(0, 0.05)
    folder = model.save(tmp_path / "saved")
    assert yaml.safe_load((folder / "subnet.yaml").read_text())["format"] == ToyPrompted.FORMAT
    loaded = families.load(folder).eval()
    assert type(loaded) is ToyPrompted and loaded.subnet == subnet
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    # a folder of a family nobody registered: one error naming the file and the key
    meta = yaml.safe_load((folder / "subnet.yaml").read_text())
    (folder / "subnet.yaml").write_text(yaml.safe_dump({**meta, "format": "other/1"}))
    with pytest.raises(NasError, match=r"subnet\.yaml.*format.*'other/1' is none of"):
        families.load(folder)
