"""Is the data loader ever the bottleneck? Loader images/s against training-step images/s.

Measures, each as the median of ``--repeats`` timed runs after one warm-up:
- decode: list file -> uint8 tensor at the model's resolution (once per split, then cached);
- cached: reading the decoded split back from the cache;
- loader: TensorLoader batches (gather, random crop + flip, normalise) on the device;
- step: a supernet training step (fresh random subnet, forward, backward, AdamW) per batch.
Two settings: the offline backbone (vit_fmnist, 28x28 grey, tiny_cpu space) on mini-VTAB's
dsprites_loc, and, with --vit-b, ViT-B/16 at 224x224 RGB on NOAH's VTAB space (stand-in
images of the right shape: throughput does not depend on content).

Run: python -m benchmarks loader-vs-step [--device cuda] [--vit-b] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine, timed
from nas.data.decode import DecodedSplit, decode_split
from nas.data.lists import read_vtab
from nas.data.loader import TensorLoader
from nas.data.mini_vtab import prepare
from nas.families import build_prompted
from nas.space.search_space import load_space
from trainers.optim import build_optimizer


def loader_rate(split: DecodedSplit, batch: int, mean, std, device, repeats: int) -> float:
    loader = TensorLoader(
        split, batch, mean, std, shuffle=True, device=device, crop_pad=2, hflip=True, drop_last=True
    )

    def epoch():
        for x, _ in loader:
            x.sum()  # consume

    return len(loader) * batch / timed(epoch, repeats, device)


def step_rate(
    space, split: DecodedSplit, batch: int, mean, std, device, repeats: int, steps: int, amp: bool
) -> float:
    model = build_prompted(space.backbone, space, split).to(device)
    optimizer = build_optimizer(model, 1e-3)
    loader = TensorLoader(split, batch, mean, std, shuffle=True, device=device, drop_last=True)
    batches = [b for _, b in zip(range(steps), loader, strict=False)]
    rng = random.Random(0)
    model.train()

    def run():
        for x, y in batches:
            model.set_subnet(space.sample(rng))
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return len(batches) * batch / timed(run, repeats, device)


def small_setting(device, repeats: int, work: Path) -> dict:
    prepare(work, ("dsprites_loc",), test_size=200, log=lambda *_: None)
    split = read_vtab(work / "dsprites_loc")["trainval"]
    space = load_space("tiny_cpu")
    mean, std = space.backbone.normalisation()
    cache = work / "cache"
    decode_s = timed(lambda: decode_split(split, 28, 1), repeats, device)
    decode_split(split, 28, 1, cache_dir=cache)
    cached_s = timed(lambda: decode_split(split, 28, 1, cache_dir=cache), repeats, device)
    decoded = decode_split(split, 28, 1)
    batch = 64
    return {
        "setting": "vit_fmnist 28x28 grey, tiny_cpu space, batch 64",
        "decode_img_s": len(split) / decode_s,
        "cached_img_s": len(split) / cached_s,
        "loader_img_s": loader_rate(decoded, batch, mean, std, device, repeats),
        "step_img_s": step_rate(
            space, decoded, batch, mean, std, device, repeats, 10, amp=device.type == "cuda"
        ),
    }


def vit_b_setting(device, repeats: int) -> dict:
    space = load_space("noah_vtab")
    n, batch = 1024, 64
    split = DecodedSplit(
        "stand-in",
        torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8),
        torch.randint(0, 100, (n,)),
        100,
        None,
        "random",
    )
    mean, std = space.backbone.normalisation()
    return {
        "setting": "ViT-B/16 224x224 RGB, noah_vtab space, batch 64, bf16",
        "loader_img_s": loader_rate(split, batch, mean, std, device, repeats),
        "step_img_s": step_rate(space, split, batch, mean, std, device, repeats, 8, amp=True),
    }


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vit-b", action="store_true", help="also ViT-B/16 (needs a GPU)")
    parser.add_argument("--json", help="write the results here")


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(device),
        "torch": torch.__version__,
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        results["runs"].append(small_setting(device, args.repeats, Path(tmp)))
    if args.vit_b:
        results["runs"].append(vit_b_setting(device, args.repeats))
    for run in results["runs"]:
        run["loader_over_step"] = run["loader_img_s"] / run["step_img_s"]
        print(json.dumps(run))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0
