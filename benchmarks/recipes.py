"""How the benchmarks train, through the pipeline's own pieces: models from the one builder
(``nas.families.build_prompted``), schedules from the stages' settings
(``nas.spec.stages``), supernet steps from ``nas.training.sampling`` as the supernet stage
draws them, and the mini-VTAB tasks prepared as the pipeline prepares them. Nothing here
restates a recipe: a benchmark names the settings it differs in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from nas.data.decode import DecodedSplit, decode_split
from nas.data.lists import read_vtab
from nas.data.mini_vtab import prepare
from nas.families import build_prompted
from nas.families.prompted import PromptedModel
from nas.space.cost import subnet_params
from nas.space.search_space import SearchSpace, load_space
from nas.space.subnet import Subnet
from nas.spec.stages import RetrainSettings, SupernetSettings, TrainingSettings
from nas.training.evaluate import evaluate
from nas.training.sampling import supernet_steps
from nas.training.train import TrainConfig, train

BUDGET = 20_000  # trainable module parameters, as in the mini-VTAB tables (7.8% of tiny_cpu)
SUBNET_SEED = 20  # the draw of the ground-truth subnets
#: The weight decay of every benchmark recipe (the stages' default).
WEIGHT_DECAY = 1e-4
#: The retraining recipe of the mini-VTAB benchmarks (experiments/benchmark_mini_vtab.yaml):
#: 15 epochs, batch 64, 2 warm-up epochs, at the supernet's most common swept rate (5e-3).
RETRAIN = RetrainSettings(epochs=15, warmup_epochs=2)
RECIPE = RETRAIN.train_config(lr=5e-3, weight_decay=WEIGHT_DECAY, seed=0)
#: The single modules' learning-rate sweep (the benchmark's grid): 10 epochs on train800, no
#: warm-up, chosen on val200.
SWEEP = TrainingSettings(epochs=10, warmup_epochs=0)
SWEEP_LRS = (1e-3, 5e-3, 2e-2)

#: Supernet variants: the supernet stage's sampling settings (``SupernetSettings``) that differ
#: from NOAH's.
VARIANTS: dict[str, dict[str, Any]] = {
    "noah": {},
    "in_budget": {"in_budget": True},
    "balanced": {"sampling": "balanced", "in_budget": True},
    "balanced_all": {"sampling": "balanced"},
    "sandwich": {"sandwich": True, "in_budget": True},
    "sandwich_distill": {"sandwich": True, "in_budget": True, "distill": 0.5},
    "distill": {"in_budget": True, "distill": 0.5},
    "two_per_step": {"in_budget": True, "subnets_per_step": 2},
    "sandwich_all": {"sandwich": True},  # the whole supernet's largest and smallest
    "sandwich_all_k2": {"sandwich": True, "subnets_per_step": 2},  # and two random draws
    "sandwich_distill_all": {"sandwich": True, "distill": 0.5},
}
#: The sampling settings a variant's cached run records.
SAMPLING_FIELDS = ("sampling", "in_budget", "subnets_per_step", "sandwich", "distill")


def space_with_budget(max_params: int = BUDGET, name: str = "tiny_cpu") -> SearchSpace:
    space = load_space(name)
    params = dataclasses.replace(space.budget.params, high=float(max_params))
    return dataclasses.replace(space, budget=dataclasses.replace(space.budget, params=params))


def in_budget_draws(space: SearchSpace, n: int, seed: int) -> list[Subnet]:
    """``n`` distinct in-budget subnets drawn as the search draws its random candidates
    (NOAH's per-layer sampling, rejected outside the budget)."""
    rng = random.Random(seed)
    out: list[Subnet] = []
    while len(out) < n:
        s = space.sample(rng)
        if space.admits(s) and s not in out:
            out.append(s)
    return out


def ground_truth_subnets(space: SearchSpace, n: int, seed: int = SUBNET_SEED) -> list[Subnet]:
    """The subnets every supernet's ranking is measured against."""
    return in_budget_draws(space, n, seed)


def recipe_key(cfg: TrainConfig = RECIPE) -> str:
    """A retraining recipe's cache key: its settings but the seed, hashed."""
    blob = json.dumps({k: v for k, v in cfg.to_dict().items() if k != "seed"}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def task_data(task: str, data_root: Path, space: SearchSpace) -> dict[str, DecodedSplit]:
    """The task's splits, prepared as the pipeline prepares a mini-VTAB task (alone, seed 0),
    so that what is measured holds for the pipeline's own data."""
    folder = data_root / task
    if not (folder / "test.txt").is_file():
        staging = folder.parent / f".{task}.{os.getpid()}.staging"
        prepare(staging, (task,), log=lambda *_: None)
        if not (folder / "test.txt").is_file():  # another process may have finished first
            os.replace(staging / task, folder)
    splits = read_vtab(folder)
    g = space.geometry
    return {
        k: decode_split(splits[k], g.image_size, g.in_chans)
        for k in ("train", "val", "trainval", "test")
    }


def supernet_settings(variant: str, epochs: int, warmup_epochs: int = 2) -> SupernetSettings:
    """The supernet stage's settings for ``variant``, over ``epochs`` (batch 64, wd 1e-4)."""
    return SupernetSettings(
        epochs=epochs, warmup_epochs=min(warmup_epochs, epochs), **VARIANTS[variant]
    )


def train_supernet(
    space: SearchSpace, split: DecodedSplit, settings: SupernetSettings, lr: float, seed: int
) -> tuple[PromptedModel, dict[str, Any], float]:
    """The supernet of ``space`` trained on ``split`` as the pipeline's supernet stage trains
    it under ``settings`` at rate ``lr``; with its sampling settings and the seconds taken."""
    cfg = settings.train_config(lr=lr, weight_decay=WEIGHT_DECAY, seed=seed)
    mean, std = space.backbone.normalisation()
    started = time.time()
    torch.manual_seed(seed)
    supernet = build_prompted(space.backbone, space, split)
    train(supernet, split, cfg, mean=mean, std=std, sample_subnet=supernet_steps(space, settings))
    sampling = {f: getattr(settings, f) for f in SAMPLING_FIELDS}
    return supernet, sampling, time.time() - started


def train_alone(
    space: SearchSpace, subnet: Subnet, split: DecodedSplit, cfg: TrainConfig
) -> PromptedModel:
    """``subnet``'s own model from the pretrained backbone, trained on ``split`` by ``cfg``."""
    mean, std = space.backbone.normalisation()
    torch.manual_seed(cfg.seed)
    model = build_prompted(space.backbone, space, split, subnet=subnet)
    train(model, split, cfg, mean=mean, std=std)
    return model


def retrained(
    space: SearchSpace,
    subnet: Subnet,
    data: dict[str, DecodedSplit],
    seed: int,
    lr: float = RECIPE.lr,
) -> float:
    """The retraining recipe (at ``lr``) on train+val from the pretrained backbone; test
    accuracy."""
    cfg = dataclasses.replace(RECIPE, seed=seed, lr=lr)
    model = train_alone(space, subnet, data["trainval"], cfg)
    mean, std = space.backbone.normalisation()
    return evaluate(model, data["test"], mean=mean, std=std)


def sweep_point(
    space: SearchSpace, subnet: Subnet, data: dict[str, DecodedSplit], seed: int, lr: float
) -> float:
    """Validation accuracy of ``subnet`` trained alone on train800 at ``lr`` (the sweep)."""
    cfg = SWEEP.train_config(lr=lr, weight_decay=WEIGHT_DECAY, seed=seed)
    model = train_alone(space, subnet, data["train"], cfg)
    mean, std = space.backbone.normalisation()
    return evaluate(model, data["val"], mean=mean, std=std)


def sweep_key(subnet: Subnet, seed: int, lr: float) -> str:
    blob = json.dumps(subnet.to_data(), sort_keys=True, separators=(",", ":"))
    return f"{blob}|{seed}|{lr:g}|{SWEEP.epochs}"


def largest_uniform(space: SearchSpace) -> Subnet:
    """Every module at its deepest, one dim per module; the most parameters in budget."""
    kinds = sorted(space.modules)
    best, best_params = None, -1
    for dims in itertools.product(*(space.modules[k].dims for k in kinds)):
        depth = {k: max(space.modules[k].depths) for k in kinds}
        subnet = Subnet({k: (d,) * depth[k] for k, d in zip(kinds, dims, strict=True) if d})
        params = subnet_params(subnet, space.geometry)
        if space.admits(subnet) and params > best_params:
            best, best_params = subnet, params
    if best is None:
        raise ValueError(f"no uniform subnet of {space.name!r} fits the budget")
    return best


def largest_single(space: SearchSpace, kind: str) -> Subnet:
    """One module kind on every layer at the largest dim (by parameters: a vector kind's dims
    are sets; among an adapter's equal sizes, Adapter+'s own setting) that keeps it in
    budget."""
    ms = space.modules[kind]
    for dim in [d for d in ms.ordered_dims() if d][::-1]:
        subnet = Subnet({kind: (dim,) * max(ms.depths)})
        if space.admits(subnet):
            return subnet
    raise ValueError(f"no uniform {kind} subnet fits the budget")
