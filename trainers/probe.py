"""Linear probes: how much a frozen backbone's features say about a task.

Features are the backbone's pooled pre-logits. A multinomial logistic regression is fitted by
full-batch L-BFGS; its L2 strength is chosen on the validation split (train800 -> val200),
then refitted on train800val200 and scored once on test. No test-set selection.
Run: ``python -m trainers.probe --backbone vit_fmnist --data DIR [--random]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from torch import nn

from nas.data.decode import DecodedSplit, decode_split
from nas.data.lists import read_vtab
from nas.data.loader import TensorLoader
from nas.families.vit.spec import BackboneSpec, load_backbone

L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2)


@torch.no_grad()
def features(model: nn.Module, split: DecodedSplit, mean, std, batch_size: int = 512):
    model.eval()
    out = []
    for x, _ in TensorLoader(split, batch_size, mean, std):
        out.append(model.forward_head(model.forward_features(x), pre_logits=True))
    return torch.cat(out)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float) -> nn.Linear:
    torch.manual_seed(0)
    head = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=500, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(x), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def accuracy(head: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (head(x).argmax(1) == y).float().mean().item()


def linear_probe(model: nn.Module, splits: dict[str, DecodedSplit], mean, std) -> dict:
    """Test accuracy of a validation-tuned linear probe on the frozen ``model``."""
    f = {name: features(model, s, mean, std) for name, s in splits.items()}
    mu, sigma = f["train"].mean(0), f["train"].std(0) + 1e-6
    f = {k: (v - mu) / sigma for k, v in f.items()}
    y = {name: s.labels for name, s in splits.items()}
    c = splits["train"].num_classes
    val = {
        l2: accuracy(fit_logistic(f["train"], y["train"], c, l2), f["val"], y["val"])
        for l2 in L2_GRID
    }
    best = max(val, key=lambda k: (val[k], -k))
    mu, sigma = f["trainval"].mean(0), f["trainval"].std(0) + 1e-6
    head = fit_logistic((f["trainval"] - mu) / sigma, y["trainval"], c, best)
    return {
        "test": accuracy(head, (f["test"] - mu) / sigma, y["test"]),
        "val": val[best],
        "l2": best,
    }


def probe_task(
    spec: BackboneSpec,
    folder: str,
    *,
    random_init: bool = False,
    seed: int = 0,
    cache_dir: str | None = None,
) -> dict:
    torch.manual_seed(seed)
    if random_init:
        spec = BackboneSpec(spec.model, spec.overrides, None, spec.mean, spec.std, spec.name)
    model = spec.create(0)
    g = spec.geometry()
    size = model.patch_embed.img_size
    splits = {
        name: decode_split(s, size, g.in_chans, cache_dir) for name, s in read_vtab(folder).items()
    }
    mean, std = spec.normalisation()
    return linear_probe(model, splits, mean, std)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="vit_fmnist")
    parser.add_argument("--data", required=True, help="a mini-VTAB folder (nas data prepare)")
    parser.add_argument("--tasks", nargs="*", help="task folders (default: all in --data)")
    parser.add_argument("--seeds", type=int, default=3, help="random initialisations to average")
    args = parser.parse_args(argv)
    from pathlib import Path

    spec = load_backbone(args.backbone)
    root = Path(args.data)
    tasks = args.tasks or sorted(p.name for p in root.iterdir() if (p / "test.txt").is_file())
    print(f"| task | pretrained | random init (mean of {args.seeds}) |")
    print("|---|---|---|")
    for task in tasks:
        pre = probe_task(spec, str(root / task))["test"]
        rand = [
            probe_task(spec, str(root / task), random_init=True, seed=s)["test"]
            for s in range(args.seeds)
        ]
        print(f"| {task} | {pre:.3f} | {sum(rand) / len(rand):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
