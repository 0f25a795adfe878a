"""Training loops (Ray-free): the supernet learns, and resuming from a checkpoint is exact."""

from __future__ import annotations

import pytest
import torch

from nas.data.decode import decode_split
from nas.data.formats import read_vtab
from nas.model import PromptedViT
from nas.space import load_space
from nas.subnet import Subnet
from tests.test_data import mini_vtab  # noqa: F401 - session fixture
from trainers.train import TrainConfig, evaluate, evaluate_candidates, lr_at, train


def setup(folder):
    space = load_space("tiny_cpu")
    splits = read_vtab(folder)
    data = {k: decode_split(splits[k], 28, 1) for k in ("train", "val")}
    mean, std = space.backbone.normalisation()
    return space, data, mean, std


def test_lr_schedule():
    cfg = TrainConfig(epochs=10, lr=1e-3, warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-5)
    assert lr_at(cfg, 0, 5) == 1e-6
    assert abs(lr_at(cfg, 10, 5) - 1e-3) < 1e-12
    assert abs(lr_at(cfg, 50, 5) - 1e-5) < 1e-12
    assert lr_at(cfg, 30, 5) < lr_at(cfg, 20, 5)


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
    from trainers.train import score_candidates

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
