"""Training loops (Ray-free): the supernet learns, and resuming from a checkpoint is exact."""

from __future__ import annotations

import math

import pytest
import torch

from nas.data.decode import decode_split
from nas.data.lists import read_vtab
from nas.families.vit.model import PromptedViT
from nas.space.search_space import load_space
from nas.space.subnet import Subnet
from nas.training.evaluate import evaluate, evaluate_candidates
from nas.training.train import TrainConfig, lr_scheduler, train
from tests.test_data import mini_vtab  # noqa: F401 - session fixture


def setup(folder):
    space = load_space("tiny_cpu")
    splits = read_vtab(folder)
    data = {k: decode_split(splits[k], 28, 1) for k in ("train", "val")}
    mean, std = space.backbone.normalisation()
    return space, data, mean, std


def reference_lr(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The schedule the loop had before timm's (our own code, kept here as the reference):
    linear warm-up from warmup_lr to lr, then cosine decay to min_lr."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / warmup
    total = max(1, cfg.epochs * steps_per_epoch - warmup)
    progress = min(1.0, (step - warmup) / total)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("warmup_epochs", [0, 2])
def test_timm_schedule_is_the_old_one_at_every_step_and_scales_each_group(warmup_epochs):
    cfg = TrainConfig(epochs=10, lr=1e-3, warmup_epochs=warmup_epochs, warmup_lr=1e-6, min_lr=1e-5)
    groups = [
        {"params": [torch.nn.Parameter(torch.zeros(2))], "lr_scale": 1.0},
        {"params": [torch.nn.Parameter(torch.zeros(2))], "lr_scale": 4.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    schedule = lr_scheduler(optimizer, cfg, steps_per_epoch=5)
    for step in range(10 * 5 + 3):  # and past the end: min_lr
        schedule.step_update(step)
        want = reference_lr(cfg, step, 5)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12, abs=1e-18)
        assert optimizer.param_groups[1]["lr"] == pytest.approx(4 * want, rel=1e-12, abs=1e-18)
    assert reference_lr(cfg, 0, 5) == (1e-6 if warmup_epochs else 1e-3)


def test_supernet_training_learns_and_resumes_exactly(mini_vtab):  # noqa: F811
    space, data, mean, std = setup(mini_vtab / "dsprites_loc")
    cfg = TrainConfig(epochs=2, batch_size=64, lr=5e-3, seed=3)

    def fresh():
        torch.manual_seed(0)
        return PromptedViT.supernet(space, data["train"].num_classes)

    full = fresh()
    before = evaluate_candidates(
        full, [space.largest(), space.smallest()], data["val"], mean=mean, std=std
    )
    states = {}
    train(
        full,
        data["train"],
        cfg,
        mean=mean,
        std=std,
        sample_subnet=space.sample,
        on_epoch=lambda e, m, get: states.__setitem__(e, get()),
    )
    after = evaluate_candidates(
        full, [space.largest(), space.smallest()], data["val"], mean=mean, std=std
    )
    assert after[0] > before[0] + 0.15, (before, after)  # 7 classes: chance is 0.14

    resumed = fresh()
    train(
        resumed, data["train"], cfg, mean=mean, std=std, sample_subnet=space.sample, state=states[1]
    )
    a, b = full.trainable_state_dict(), resumed.trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fixed_subnet_training(mini_vtab):  # noqa: F811
    space, data, mean, std = setup(mini_vtab / "digits")
    torch.manual_seed(0)
    model = PromptedViT.for_subnet(space.backbone.create(10), Subnet({"lora": [4] * 6}))
    start = evaluate(model, data["val"], mean=mean, std=std)
    metrics = train(model, data["train"], TrainConfig(epochs=2, lr=2e-3), mean=mean, std=std)
    assert metrics["train_loss"] > 0
    assert evaluate(model, data["val"], mean=mean, std=std) > start + 0.3
    assert model.subnet == Subnet({"lora": [4] * 6})


def test_a_non_finite_loss_stops_training_with_the_epoch(mini_vtab):  # noqa: F811
    space, data, mean, std = setup(mini_vtab / "digits")
    torch.manual_seed(0)
    model = PromptedViT.for_subnet(space.backbone.create(10), Subnet({"lora": [4] * 6}))
    seen = []
    cfg = TrainConfig(epochs=2, lr=1e30, warmup_epochs=0)
    with pytest.raises(FloatingPointError, match="loss is nan in epoch 1"):
        train(model, data["train"], cfg, mean=mean, std=std, on_epoch=lambda *a: seen.append(a))
    assert not seen  # no checkpoint of the broken epoch


def test_candidates_are_scored_by_accuracy_and_loss(mini_vtab):  # noqa: F811
    import torch.nn.functional as F

    from nas.data.loader import TensorLoader
    from nas.training.evaluate import score_candidates

    space, data, mean, std = setup(mini_vtab / "digits")
    torch.manual_seed(0)
    model = PromptedViT.supernet(space, 10)
    subnets = [space.largest(), Subnet({"lora": [4, 4]})]
    scores = score_candidates(model, subnets, data["val"], mean=mean, std=std, batch_size=64)
    (x, y), *rest = list(TensorLoader(data["val"], 10_000, mean, std))
    assert not rest
    model.eval()
    for subnet, score in zip(subnets, scores, strict=True):
        model.set_subnet(subnet)
        with torch.no_grad():
            logits = model(x)
        assert score["acc"] == (logits.argmax(1) == y).sum().item() / len(y)
        assert score["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert evaluate_candidates(model, subnets, data["val"], mean=mean, std=std) == [
        s["acc"] for s in scores
    ]
