"""Supervised pretraining of a small timm ViT on Fashion-MNIST: the project's offline backbone.

No ViT weights can be downloaded on the project's machines, and prompt tuning on a frozen
random backbone means little, so this recipe trains one (see experiments/pretrain_vit_fmnist.yaml
and backbones/vit_fmnist/MODEL_CARD.md). Run: ``python -m trainers.pretrain SPEC [--out DIR]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from nas.core.validate import Reader
from nas.core.yamlio import load_yaml
from nas.data.augment import normalise, random_crop_flip
from nas.data.hashing import image_fingerprints
from nas.data.sources import FASHION_MNIST_DIR, load_fashion_mnist
from nas.families.vit.spec import BackboneSpec


@dataclass(frozen=True)
class PretrainConfig:
    backbone: BackboneSpec
    data_dir: Path
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_epochs: int
    label_smoothing: float
    drop_path: float
    crop_pad: int
    hflip: bool
    seed: int
    output: Path


def load_config(path: str | Path) -> PretrainConfig:
    doc = load_yaml(path)
    r = Reader(doc)
    data = r.mapping(doc.data, "", required=["backbone", "train", "output"], optional=["data"])
    bb = r.mapping(data["backbone"], "backbone", required=["model"], optional=["overrides"])
    t = r.mapping(
        data["train"],
        "train",
        required=["epochs", "batch_size", "lr"],
        optional=[
            "weight_decay",
            "warmup_epochs",
            "label_smoothing",
            "drop_path",
            "crop_pad",
            "hflip",
            "seed",
        ],
    )
    d = r.mapping(data.get("data") or {}, "data", optional=["fashion_mnist"])
    return PretrainConfig(
        backbone=BackboneSpec(bb["model"], dict(bb.get("overrides") or {})),
        data_dir=Path(d.get("fashion_mnist", FASHION_MNIST_DIR)),
        epochs=r.integer(t["epochs"], "train.epochs", minimum=1),
        batch_size=r.integer(t["batch_size"], "train.batch_size", minimum=1),
        lr=r.number(t["lr"], "train.lr", minimum=0),
        weight_decay=r.number(t.get("weight_decay", 0.05), "train.weight_decay", minimum=0),
        warmup_epochs=r.integer(t.get("warmup_epochs", 0), "train.warmup_epochs", minimum=0),
        label_smoothing=r.number(t.get("label_smoothing", 0.0), "train.label_smoothing", minimum=0),
        drop_path=r.number(t.get("drop_path", 0.0), "train.drop_path", minimum=0),
        crop_pad=r.integer(t.get("crop_pad", 0), "train.crop_pad", minimum=0),
        hflip=bool(t.get("hflip", False)),
        seed=r.integer(t.get("seed", 0), "train.seed", minimum=0),
        output=Path(data["output"]),
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean, std, batch_size: int = 1024
) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = normalise(images[i : i + batch_size], mean, std)
        with torch.autocast(x.device.type, torch.bfloat16, enabled=x.is_cuda):
            correct += (model(x).argmax(-1) == labels[i : i + batch_size]).sum().item()
    return correct / len(images)


def pretrain(cfg: PretrainConfig, out: Path | None = None, log=print) -> dict:
    out = Path(out or cfg.output)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = load_fashion_mnist(cfg.data_dir)
    x_train = torch.from_numpy(data["train"][0]).unsqueeze(1).to(device)
    y_train = torch.from_numpy(data["train"][1]).to(device)
    x_test = torch.from_numpy(data["test"][0]).unsqueeze(1).to(device)
    y_test = torch.from_numpy(data["test"][1]).to(device)
    mean = [float(x_train.float().mean() / 255)]
    std = [float(x_train.float().std() / 255)]

    model = cfg.backbone.create(10, drop_path_rate=cfg.drop_path).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or "pos_embed" in n]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=cfg.lr,
    )
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))

    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    step, start, history = 0, time.perf_counter(), []
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen).to(device)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            x = random_crop_flip(x_train[idx], cfg.crop_pad, cfg.hflip, gen)
            x = normalise(x, mean, std)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = loss_fn(model(x), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item()
            step += 1
        acc = evaluate(model, x_test, y_test, mean, std) if epoch == cfg.epochs - 1 else None
        history.append({"epoch": epoch + 1, "loss": running / steps_per_epoch})
        log(
            f"epoch {epoch + 1}/{cfg.epochs} loss {running / steps_per_epoch:.4f}"
            + (f" test acc {acc:.4f}" if acc is not None else "")
            + f" ({time.perf_counter() - start:.0f} s)"
        )
    seconds = time.perf_counter() - start
    test_acc = evaluate(model, x_test, y_test, mean, std)

    report = _save(cfg, out, model, data, test_acc, seconds, device, mean, std, history)
    log(f"saved {out}: test accuracy {test_acc:.4f} after {seconds:.0f} s")
    return report


def _save(cfg, out, model, data, test_acc, seconds, device, mean, std, history) -> dict:
    """The backbone folder: weights, backbone.yaml, the report, and the images' fingerprints
    (which later benchmarks check their own images against)."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "timm"})
    report = {
        "test_accuracy": test_acc,
        "train_seconds": round(seconds, 1),
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "epochs": cfg.epochs,
        "params": sum(p.numel() for p in model.parameters()),
        "mean": mean,
        "std": std,
        "history": history,
    }
    (out / "pretrain_report.json").write_text(json.dumps(report, indent=2))
    backbone = {
        "name": out.name,
        "model": cfg.backbone.model,
        "overrides": cfg.backbone.overrides,
        "weights": "model.safetensors",
        "mean": mean,
        "std": std,
    }
    (out / "backbone.yaml").write_text(yaml.safe_dump(backbone, sort_keys=False))
    np.save(out / "pretrain_fingerprints.npy", fingerprints(data["train"][0], data["test"][0]))
    return report


def fingerprints(*arrays: np.ndarray) -> np.ndarray:
    """Sorted 64-bit fingerprints of every image, to prove no pretraining image reappears in
    a benchmark task."""

    return np.unique(np.concatenate([image_fingerprints(a) for a in arrays]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("spec", help="pretraining YAML (experiments/pretrain_vit_fmnist.yaml)")
    parser.add_argument("--out", help="output folder (default: the spec's 'output')")
    parser.add_argument("--data", help="Fashion-MNIST folder (default: the spec's data)")
    args = parser.parse_args(argv)
    cfg = load_config(args.spec)
    if args.data:
        cfg = dataclasses.replace(cfg, data_dir=Path(args.data))
    pretrain(cfg, Path(args.out) if args.out else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
