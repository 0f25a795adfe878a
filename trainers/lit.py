"""Locked-image text tuning (LiT): a small CLIP from a frozen image tower and a text tower
trained contrastively on generated image-caption pairs. Builds ``backbones/clip_fmnist``.

The image trunk is frozen, so its features are computed once; only the image projection, the
text tower and the logit scale train. Data: procedurally drawn scenes with captions from their
attributes (``nas.data.scenes``, held-out attribute combinations excluded) and the image tower's
own pretraining images (Fashion-MNIST train) captioned "a photo of a {class}.". No image of a
benchmark task is used. Run::

    python -m trainers.lit --out backbones/clip_fmnist
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file
from torch import nn

from nas.data import scenes
from nas.data.scenes import LIT_SCENES, LIT_SEED
from nas.data.sources import FASHION_MNIST_CLASSES, load_fashion_mnist
from nas.families.clip.spec import (
    CLIP_FILE,
    ClipSpec,
    TextTower,
    class_embeddings,
    encode_tokens,
    trained_state,
)
from nas.families.vit.spec import load_backbone

CLASS_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")


@dataclass
class LitConfig:
    image_tower: str = "vit_fmnist"
    embed_dim: int = 128
    context_length: int = 32
    width: int = 128
    heads: int = 4
    layers: int = 4
    scenes: int = LIT_SCENES
    fmnist: bool = True
    steps: int = 3000
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 200
    seed: int = LIT_SEED
    eval_per_combination: int = 200
    eval_scenes: int = 2000


def article(name: str) -> str:
    return "an" if name[0] in "aeiou" else "a"


def fmnist_caption(name: str, template: str) -> str:
    return template.replace("a {}", f"{article(name)} {{}}").format(name)


def spec_of(cfg: LitConfig) -> ClipSpec:
    text = TextTower(cfg.context_length, cfg.width, cfg.heads, cfg.layers)
    return ClipSpec(
        name="clip_fmnist",
        image_tower=load_backbone(cfg.image_tower),
        text=text,
        embed_dim=cfg.embed_dim,
    )


@torch.no_grad()
def trunk_features(model: nn.Module, images: np.ndarray, mean, std, batch: int = 1024):
    """The frozen image trunk's pooled features of uint8 (N, 28, 28) images."""
    out = []
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    for start in range(0, len(images), batch):
        x = torch.from_numpy(images[start : start + batch]).float().div(255).unsqueeze(1)
        out.append(model.visual.trunk((x - m) / s))
    return torch.cat(out)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, groups: torch.Tensor, scale):
    """Symmetric InfoNCE where every pair with the same caption counts as a positive (Fashion-
    MNIST's class captions repeat within a batch)."""
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    same = (groups[:, None] == groups[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


# -- evaluation --------------------------------------------------------------------------------


def _attribute_prompts(scene: scenes.Scene, attribute: str) -> list[str]:
    """One prompt per value of ``attribute``, the scene's other attributes as they are."""
    return [
        "a photo of " + scenes.describe(scenes.Scene(**{**scene.__dict__, attribute: v})) + "."
        for v in scenes.ATTRIBUTES[attribute]
    ]


@torch.no_grad()
def attribute_accuracy(
    model, tokenizer, feats: torch.Tensor, scene_list: list[scenes.Scene], attributes
) -> dict[str, dict[str, float]]:
    """Per attribute: zero-shot accuracy choosing among that attribute's values, with prompts
    that spell out the scene's other attributes; and chance (1 / number of values)."""
    img = F.normalize(model.visual.head(feats), dim=-1)
    out = {}
    for attribute in attributes:
        rows = [i for i, s in enumerate(scene_list) if getattr(s, attribute) is not None]
        if not rows:
            continue
        correct = 0
        cache: dict[tuple[str, ...], torch.Tensor] = {}
        for i in rows:
            prompts = tuple(_attribute_prompts(scene_list[i], attribute))
            if prompts not in cache:
                cache[prompts] = F.normalize(model.encode_text(tokenizer(list(prompts))), dim=-1)
            truth = scenes.ATTRIBUTES[attribute].index(getattr(scene_list[i], attribute))
            correct += int((img[i] @ cache[prompts].T).argmax()) == truth
        out[attribute] = {
            "accuracy": correct / len(rows),
            "chance": 1 / len(scenes.ATTRIBUTES[attribute]),
            "n": len(rows),
        }
    return out


def evaluate(model, tokenizer, spec: ClipSpec, cfg: LitConfig, held, held_feats, ind, ind_feats):
    model.eval()
    report: dict = {"held_out": {}, "in_distribution": {}}
    for combination in scenes.HELD_OUT:
        rows = [i for i, s in enumerate(held) if s.matches(combination)]
        name = " + ".join(f"{k}={v}" for k, v in combination.items())
        report["held_out"][name] = attribute_accuracy(
            model, tokenizer, held_feats[rows], [held[i] for i in rows], list(combination)
        )
    report["in_distribution"] = attribute_accuracy(
        model, tokenizer, ind_feats, ind, list(scenes.ATTRIBUTES)
    )
    if cfg.fmnist:
        data = load_fashion_mnist()["test"]
        mean, std = spec.normalisation()
        feats = F.normalize(model.visual.head(trunk_features(model, data[0], mean, std)), dim=-1)
        per_name = torch.cat(
            [
                class_embeddings(model, tokenizer, [n], [fmnist_caption(n, "a photo of a {}.")])
                for n in FASHION_MNIST_CLASSES
            ]
        )
        pred = (feats @ per_name.T).argmax(1).numpy()
        report["fashion_mnist_test"] = {
            "accuracy": float((pred == data[1]).mean()),
            "chance": 0.1,
            "n": len(pred),
        }
    model.train()
    return report


# -- training ----------------------------------------------------------------------------------


def _pairs(cfg: LitConfig) -> tuple[list, list[str], int]:
    """The training images and their captions: the scenes, then (``cfg.fmnist``) the
    Fashion-MNIST images captioned from the class templates; and how many are scenes."""
    images, captions = [], []
    for image, text, _scene in scenes.training_pairs(cfg.scenes, cfg.seed):
        images.append(image)
        captions.append(text)
    n_scenes = len(images)
    if cfg.fmnist:
        x, y = load_fashion_mnist()["train"]
        rng = np.random.default_rng(cfg.seed)
        picks = rng.integers(len(CLASS_TEMPLATES), size=len(y))
        images.extend(x)
        captions.extend(
            fmnist_caption(FASHION_MNIST_CLASSES[c], CLASS_TEMPLATES[t])
            for c, t in zip(y, picks, strict=True)
        )
    return images, captions, n_scenes


def train_lit(cfg: LitConfig, out: Path | None, log=print) -> dict:
    torch.manual_seed(cfg.seed)
    spec = spec_of(cfg)
    model = spec.create(load=False)
    tokenizer = spec.tokenizer()
    mean, std = spec.normalisation()
    started = time.perf_counter()

    images, captions, n_scenes = _pairs(cfg)
    images_np = np.stack(images)
    unique = sorted(set(captions))
    index = {c: i for i, c in enumerate(unique)}
    groups = torch.tensor([index[c] for c in captions])
    ids = tokenizer(unique)
    if int((ids != 0).sum(1).max()) >= cfg.context_length:
        raise ValueError("a caption does not fit the context length")
    feats = trunk_features(model, images_np, mean, std)
    log(
        f"data: {n_scenes} scenes + {len(images) - n_scenes} Fashion-MNIST images, "
        f"{len(unique)} distinct captions; trunk features in {time.perf_counter() - started:.0f} s"
    )

    held = scenes.held_out_scenes(cfg.eval_per_combination, cfg.seed + 1)
    rng = np.random.default_rng(cfg.seed + 1)
    held_feats = trunk_features(model, np.stack([scenes.render(s, rng) for s in held]), mean, std)
    ind = [s for _, _, s in scenes.training_pairs(cfg.eval_scenes, cfg.seed + 2)]
    rng = np.random.default_rng(cfg.seed + 2)
    ind_feats = trunk_features(model, np.stack([scenes.render(s, rng) for s in ind]), mean, std)

    opt = _optimizer(model, cfg)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))

    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    model.visual.trunk.eval()
    history = []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        batch = torch.randint(len(feats), (cfg.batch_size,), generator=gen)
        g = groups[batch]
        img = model.visual.head(feats[batch])
        txt = encode_tokens(model, ids[g])
        loss = contrastive_loss(img, txt, g, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == cfg.steps - 1:
            value = loss.item()
            history.append({"step": step, "loss": value})
            log(f"step {step}/{cfg.steps}: loss {value:.4f} ({time.perf_counter() - t0:.0f} s)")
    train_seconds = time.perf_counter() - t0
    model.requires_grad_(False)
    report = {
        "config": asdict(cfg),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "logit_scale": float(model.logit_scale),
        "distinct_captions": len(unique),
        "pairs": len(images),
        "loss": history,
        "eval": evaluate(model, tokenizer, spec, cfg, held, held_feats, ind, ind_feats),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }
    if out is not None:
        save(model, cfg, out, report)
    return report


def _optimizer(model: nn.Module, cfg: LitConfig) -> torch.optim.Optimizer:
    """AdamW over everything but the frozen image trunk (made trainable here); no weight decay
    on biases, norms and embeddings."""
    trainable = {k: p for k, p in model.named_parameters() if not k.startswith("visual.trunk.")}
    for p in trainable.values():
        p.requires_grad_(True)
    decay = [p for k, p in trainable.items() if p.ndim >= 2 and "embedding" not in k]
    no_decay = [p for k, p in trainable.items() if not (p.ndim >= 2 and "embedding" not in k)]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=cfg.lr,
    )


def save(model: nn.Module, cfg: LitConfig, out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().half().contiguous() for k, v in trained_state(model).items()}
    tensors["logit_scale"] = model.logit_scale.detach().float().reshape(())
    save_file(tensors, str(out / "text_tower.safetensors"), metadata={"format": "nas-clip/1"})
    meta = {
        "name": "clip_fmnist",
        "image_tower": cfg.image_tower,
        "embed_dim": cfg.embed_dim,
        "text": {
            "context_length": cfg.context_length,
            "width": cfg.width,
            "heads": cfg.heads,
            "layers": cfg.layers,
        },
        "weights": "text_tower.safetensors",
        "template": "a photo of a {}.",
    }
    header = (
        "# The project's offline CLIP: the frozen vit_fmnist image tower and a small text tower\n"
        "# trained with locked-image tuning (trainers/lit.py). See MODEL_CARD.md.\n"
    )
    (out / CLIP_FILE).write_text(header + yaml.safe_dump(meta, sort_keys=False))
    (out / "lit_report.json").write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder to write the CLIP into")
    for name, value in asdict(LitConfig()).items():
        if isinstance(value, bool):
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    cfg = LitConfig(**{k: getattr(args, k) for k in asdict(LitConfig())})
    report = train_lit(cfg, args.out)
    print(json.dumps(report["eval"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
