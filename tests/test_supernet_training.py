"""Supernet training options (issue 20): the sandwich rule, in-place distillation, per-module
learning rates and weight decay, and the samplers that draw the subnets."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from nas.core.errors import NasError
from nas.data.decode import decode_split
from nas.data.lists import read_vtab
from nas.data.loader import TensorLoader
from nas.families.vit.model import PromptedViT
from nas.space.cost import subnet_params
from nas.space.search_space import Bounds, load_space
from nas.space.subnet import Subnet
from nas.training.sampling import BINS, make_sampler, sandwich_ends, size_range
from nas.training.train import (
    SupernetSteps,
    TrainConfig,
    distillation_loss,
    parameter_groups,
    train,
)
from tests.test_data import mini_vtab  # noqa: F401 - session fixture


def budgeted(max_params: float = 20_000):
    space = load_space("tiny_cpu")
    params = dataclasses.replace(space.budget.params, high=float(max_params))
    return dataclasses.replace(space, budget=dataclasses.replace(space.budget, params=params))


@pytest.fixture
def task(mini_vtab):  # noqa: F811
    space = budgeted()
    split = read_vtab(mini_vtab / "dsprites_loc")["train"]
    data = decode_split(split, 28, 1)
    small = dataclasses.replace(  # 128 images: two steps of 64
        data, images=data.images[:128], labels=data.labels[:128]
    )
    mean, std = space.backbone.normalisation()
    return space, small, mean, std


def supernet(space, classes: int) -> PromptedViT:
    torch.manual_seed(0)
    return PromptedViT.supernet(space, classes)


def recording(model: PromptedViT) -> list[Subnet]:
    """Every subnet the model is switched to, in order."""
    seen: list[Subnet] = []
    original = model.set_subnet

    def set_subnet(subnet: Subnet) -> None:
        seen.append(subnet)
        original(subnet)

    model.set_subnet = set_subnet  # type: ignore[method-assign]
    return seen


def test_sandwich_trains_largest_and_smallest_every_step(task):
    space, data, mean, std = task
    model = supernet(space, data.num_classes)
    seen = recording(model)
    steps = SupernetSteps(
        space.sample, per_step=2, sandwich=True, largest=space.largest(), smallest=space.smallest()
    )
    cfg = TrainConfig(epochs=2, batch_size=64, lr=1e-3)
    train(model, data, cfg, mean=mean, std=std, sample_subnet=steps)
    per_step = 4  # largest, smallest, 2 random
    batches = 2 * 2  # 2 epochs of 2 steps
    assert len(seen) == batches * per_step + 1  # + the final switch back to the model's subnet
    for step in range(batches):
        draws = seen[step * per_step : (step + 1) * per_step]
        assert draws[0] == space.largest() and draws[1] == space.smallest()
    assert len(set(seen[2::per_step]) | set(seen[3::per_step])) > 1  # the random ones vary


def test_sandwich_accumulates_into_one_optimizer_step(task, monkeypatch):
    space, data, mean, std = task
    model = supernet(space, data.num_classes)
    counts = Counter()
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        counts["steps"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    steps = SupernetSteps(
        space.sample, per_step=3, sandwich=True, largest=space.largest(), smallest=space.smallest()
    )
    train(model, data, TrainConfig(epochs=1, lr=1e-3), mean=mean, std=std, sample_subnet=steps)
    assert counts["steps"] == 2  # one per mini-batch


def manual_gradients(model, space, x, y, draws, distill):
    """One supernet step's gradients written out by hand: each draw's cross-entropy, the
    others' mixed with the KL to the largest's detached logits, averaged over the draws."""
    teacher = None
    total = 0.0
    for subnet in draws:
        model.set_subnet(subnet)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if subnet == space.largest():
            teacher = logits.detach()
        else:
            p_teacher = F.softmax(teacher, dim=1)
            kl = (p_teacher * (F.log_softmax(teacher, 1) - F.log_softmax(logits, 1))).sum(1).mean()
            loss = (1 - distill) * loss + distill * kl
        total = total + loss / len(draws)
    total.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_distillation_is_the_kl_to_the_largest_detached_predictions(task, monkeypatch):
    space, data, mean, std = task
    no_dropout = {
        k: dataclasses.replace(m, options=dataclasses.replace(m.options, dropout=0.0))
        for k, m in space.modules.items()
    }
    space = dataclasses.replace(space, modules=no_dropout)  # every forward pass repeatable
    data = dataclasses.replace(data, images=data.images[:64], labels=data.labels[:64])
    cfg = TrainConfig(epochs=1, batch_size=64, lr=1e-2, warmup_epochs=0, seed=5)
    steps = SupernetSteps(
        space.sample,
        per_step=1,
        sandwich=True,
        largest=space.largest(),
        smallest=space.smallest(),
        distill=0.7,
    )
    trained = supernet(space, data.num_classes)
    seen = recording(trained)
    grads = {}
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):  # the gradients that reach the optimizer
        grads.update(
            (n, p.grad.clone()) for n, p in trained.named_parameters() if p.grad is not None
        )
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    train(trained, data, cfg, mean=mean, std=std, sample_subnet=steps)
    draws = seen[:3]
    assert draws[:2] == [space.largest(), space.smallest()]

    by_hand = supernet(space, data.num_classes)
    loader = TensorLoader(data, 64, mean, std, shuffle=True, seed=cfg.seed)
    loader.set_epoch(0)
    ((x, y),) = list(loader)
    by_hand.train()
    expected = manual_gradients(by_hand, space, x, y, draws, distill=0.7)
    assert set(grads) == set(expected)
    for name, g in expected.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-7, msg=name)
    # without distillation the same draws give other gradients: the KL term is really there
    plain = supernet(space, data.num_classes)
    plain.train()
    other = manual_gradients(plain, space, x, y, draws, distill=0.0)
    assert any(not torch.allclose(other[n], g, rtol=1e-3) for n, g in expected.items())


def test_distillation_loss_values():
    teacher = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    assert distillation_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    student = torch.tensor([[0.0, 1.0, 0.0]], requires_grad=True)
    p, q = F.softmax(teacher, 1), F.softmax(student, 1)
    expected = (p * (p.log() - q.log())).sum()
    loss = distillation_loss(student, teacher)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad is not None  # the teacher is detached


def test_distillation_without_sandwich_uses_the_largest_without_training_it_by_labels(task):
    space, data, mean, std = task
    model = supernet(space, data.num_classes)
    seen = recording(model)
    steps = SupernetSteps(space.sample, largest=space.largest(), distill=1.0)
    train(model, data, TrainConfig(epochs=1, lr=1e-3), mean=mean, std=std, sample_subnet=steps)
    # per step: the teacher's forward (no gradient), then the one random draw
    assert seen[0] == space.largest() and seen[2] == space.largest()
    assert len(seen) == 2 * 2 + 1


def test_default_steps_are_noahs_one_subnet_per_batch(task):
    space, data, mean, std = task
    cfg = TrainConfig(epochs=2, lr=5e-3, seed=3)
    a, b = supernet(space, data.num_classes), supernet(space, data.num_classes)
    train(a, data, cfg, mean=mean, std=std, sample_subnet=space.sample)
    train(b, data, cfg, mean=mean, std=std, sample_subnet=SupernetSteps(space.sample))
    sa, sb = a.trainable_state_dict(), b.trainable_state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_module_learning_rates_reach_the_optimizer(task):
    space, data, mean, std = task
    model = supernet(space, data.num_classes)
    cfg = TrainConfig(
        epochs=1,
        lr=1e-3,
        weight_decay=0.1,
        module_lr={"lora": 4.0, "head": 0.5},
        module_weight_decay={"vpt": 0.0},
    )
    groups = {g["name"]: g for g in parameter_groups(model, cfg)}
    assert set(groups) == {"vpt", "lora", "adapter", "head"}
    assert groups["lora"]["lr_scale"] == 4.0 and groups["head"]["lr_scale"] == 0.5
    assert groups["adapter"]["lr_scale"] == 1.0
    assert groups["vpt"]["weight_decay"] == 0.0 and groups["lora"]["weight_decay"] == 0.1
    lora_ids = {id(p) for p in model.prompt_modules["lora"].parameters()}
    assert {id(p) for p in groups["lora"]["params"]} == lora_ids
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(model.trainable_parameters())

    # and they act: a multiplier of 0 freezes LoRA while the other modules move
    frozen_lora = dataclasses.replace(cfg, module_lr={"lora": 0.0}, module_weight_decay={})
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    train(model, data, frozen_lora, mean=mean, std=std, sample_subnet=space.sample)
    after = model.trainable_state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and not any(".lora." in k for k in moved)
    assert any(".adapter." in k for k in moved)


def test_unit_multipliers_train_exactly_as_one_group(task):
    space, data, mean, std = task
    cfg = TrainConfig(epochs=1, lr=5e-3, seed=1)
    a, b = supernet(space, data.num_classes), supernet(space, data.num_classes)
    train(a, data, cfg, mean=mean, std=std, sample_subnet=space.sample)
    ones = dataclasses.replace(cfg, module_lr={"vpt": 1.0, "head": 1.0})
    assert len(parameter_groups(b, ones)) == 4
    train(b, data, ones, mean=mean, std=std, sample_subnet=space.sample)
    sa, sb = a.trainable_state_dict(), b.trainable_state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-7, msg=k)


def test_a_multiplier_for_an_unknown_group_is_refused(task):
    space, data, _, _ = task
    cfg = TrainConfig(epochs=1, module_lr={"lroa": 2.0})
    with pytest.raises(ValueError, match="lroa"):
        parameter_groups(supernet(space, data.num_classes), cfg)


def test_train_config_flattens_multipliers_for_tracking():
    cfg = TrainConfig(epochs=1, module_lr={"pgn": 4.0})
    flat = cfg.to_dict()
    assert flat["module_lr.pgn"] == 4.0 and "module_lr" not in flat
    assert "module_lr.pgn" not in TrainConfig(epochs=1).to_dict()


# -- samplers ---------------------------------------------------------------------------------


def test_uniform_sampler_is_noahs_stream():
    space = budgeted()
    a, b = random.Random(3), random.Random(3)
    sampler = make_sampler(space)
    assert [sampler(a) for _ in range(50)] == [space.sample(b) for _ in range(50)]


def test_in_budget_sampler_only_draws_admitted_subnets():
    space = budgeted()
    rng = random.Random(0)
    sampler = make_sampler(space, "uniform", in_budget=True)
    draws = [sampler(rng) for _ in range(300)]
    assert all(space.admits(s) for s in draws)
    assert len(set(draws)) > 250
    plain = [space.sample(random.Random(i)) for i in range(300)]
    assert sum(space.admits(s) for s in plain) < 240  # many of NOAH's draws miss this budget


def test_balanced_sampler_spreads_draws_over_sizes():
    space = load_space("tiny_cpu")
    g = space.geometry
    low, high = size_range(space, in_budget=False)
    width = (high - low) / BINS

    def bins(draws):
        return Counter(min(int((subnet_params(s, g) - low) / width), BINS - 1) for s in draws)

    balanced = bins(make_sampler(space, "balanced")(random.Random(i)) for i in range(800))
    noah = bins(space.sample(random.Random(i)) for i in range(800))
    assert all(balanced[b] >= 800 / BINS * 0.5 for b in range(BINS)), balanced
    assert balanced[BINS - 1] > 5 * max(noah[BINS - 1], 1), (balanced, noah)


def test_balanced_in_budget_sampler_stays_in_budget_and_reaches_its_top():
    space = budgeted()
    g = space.geometry
    sampler = make_sampler(space, "balanced", in_budget=True)
    draws = [sampler(random.Random(i)) for i in range(400)]
    assert all(space.admits(s) for s in draws)
    sizes = [subnet_params(s, g) for s in draws]
    assert sum(size > 17_500 for size in sizes) >= 400 / BINS * 0.5


def test_unreachable_in_budget_sampling_is_one_clear_error():
    space = load_space("tiny_cpu")  # a budget no subnet meets (spec loading refuses it)
    budget = dataclasses.replace(space.budget, params=Bounds(low=1e9))
    space = dataclasses.replace(space, budget=budget)
    with pytest.raises(NasError, match="none of 10,000 draws"):
        make_sampler(space, in_budget=True)(random.Random(0))


def test_in_budget_sandwich_ends_are_the_largest_and_smallest_in_budget():
    space = budgeted()
    g = space.geometry
    largest, smallest = sandwich_ends(space, in_budget=True)
    assert space.admits(largest) and space.admits(smallest)
    assert largest == Subnet({"adapter": [8] * 6})  # 19,632 parameters: the most of any uniform
    assert subnet_params(largest, g) > max(
        subnet_params(s, g) for s in (Subnet({"lora": [4] * 6}), Subnet({"vpt": [8] * 6}))
    )
    assert smallest == Subnet()
    assert sandwich_ends(space, in_budget=False) == (space.largest(), space.smallest())
    assert not space.admits(space.largest())
