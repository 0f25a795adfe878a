"""The GPU path of every model family, checked on a CUDA device (the CPU tests cannot see it).

For each family — NOAH's three modules with PGN on the committed ViT (`noah_pgn_cpu`), PGN
deployed as a border of patches (`noah_pgn_border_cpu`), NOAH's three with SSF and bias tuning
(`noah_extended_cpu`), and CoOp / VPT / UPT / LoRA on the committed CLIP (`clip_cpu`):

1. random subnets' logits on the GPU in float32 against the same model on the CPU (max abs
   difference), the standalone export against the supernet on the GPU, and the export with the
   mergeable kinds folded into the frozen weights against it;
2. two epochs of the pipeline's own training loop on the GPU (bf16 autocast, a fresh subnet per
   batch): the loss finite, the frozen weights bit-identical, the prompt weights changed;
3. the training step of the family's largest subnet against the frozen backbone's own
   forward + backward (the floor no prompt method beats), bf16, batch 64.

Run: python -m benchmarks cuda-check [--json benchmarks/results/cuda_check_DATE.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from benchmarks.common import machine, sync, timed
from nas.data.decode import DecodedSplit
from nas.families import build_prompted
from nas.space.search_space import load_space
from nas.space.subnet import Subnet
from nas.training.train import TrainConfig, train

FAMILIES = ("noah_pgn_cpu", "noah_pgn_border_cpu", "noah_extended_cpu", "clip_cpu")
CLASSES = ["circle", "square", "triangle", "cross", "star"]


def random_split(n: int, seed: int = 0) -> DecodedSplit:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % len(CLASSES)
    return DecodedSplit("train", images, labels, len(CLASSES), CLASSES, "random")


def perturbed_supernet(space, split):
    """The supernet with its prompt weights moved off their initialisation (zero-initialised
    parts would hide differences)."""
    torch.manual_seed(0)
    model = build_prompted(space.backbone, space, split)
    with torch.no_grad():
        for name, p in model.prompt_modules.named_parameters():
            if ".generators." not in f".{name}":
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def equivalence(space, split, device, draws: int) -> dict:
    model = perturbed_supernet(space, split)
    mean, std = space.backbone.normalisation()
    x = (split.images[:16].float() / 255 - mean[0]) / std[0]
    rng = random.Random(0)
    subnets = [space.sample(rng) for _ in range(draws)] + [space.largest()]
    cpu = []
    with torch.no_grad():
        for s in subnets:
            model.set_subnet(s)
            cpu.append(model(x))
    model.to(device)
    gpu_vs_cpu = export_vs_supernet = merged_vs_supernet = 0.0
    with torch.no_grad():
        for s, ref in zip(subnets, cpu, strict=True):
            model.set_subnet(s)
            out = model(x.to(device))
            alone = model.export().eval()
            merged = model.export(merge=True).eval()
            gpu_vs_cpu = max(gpu_vs_cpu, (out.cpu() - ref).abs().max().item())
            export_vs_supernet = max(
                export_vs_supernet, (alone(x.to(device)) - out).abs().max().item()
            )
            merged_vs_supernet = max(
                merged_vs_supernet, (merged(x.to(device)) - out).abs().max().item()
            )
    return {
        "subnets": len(subnets),
        "max_abs_diff_gpu_vs_cpu_fp32": gpu_vs_cpu,
        "max_abs_diff_export_vs_supernet_gpu": export_vs_supernet,
        "max_abs_diff_merged_vs_supernet_gpu": merged_vs_supernet,
        "logit_scale": cpu[-1].abs().max().item(),
    }


def training(space, split, device) -> dict:
    model = perturbed_supernet(space, split).to(device)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {k: v.clone() for k, v in model.prompt_modules.state_dict().items()}
    cfg = TrainConfig(epochs=2, batch_size=32, lr=1e-3, weight_decay=1e-4)
    mean, std = space.backbone.normalisation()
    start = time.perf_counter()
    metrics = train(model, split, cfg, mean=mean, std=std, sample_subnet=space.sample)
    sync(device)
    seconds = time.perf_counter() - start
    after = dict(model.named_parameters())
    changed = [
        k for k, v in model.prompt_modules.state_dict().items() if not torch.equal(before[k], v)
    ]
    frozen_same = all(torch.equal(v, after[k]) for k, v in frozen.items())
    return {
        "metrics": metrics,
        "loss_finite": all(torch.isfinite(torch.tensor(v)).item() for v in metrics.values()),
        "frozen_weights": len(frozen),
        "frozen_weights_identical": frozen_same,
        "prompt_tensors_changed": f"{len(changed)} of {len(before)}",
        "seconds": seconds,
    }


def step_cost(space, split, device, repeats: int, batch: int = 64, steps: int = 8) -> dict:
    mean, std = space.backbone.normalisation()
    x = ((split.images[:batch].float() / 255 - mean[0]) / std[0]).to(device)
    y = split.labels[:batch].to(device)
    model = perturbed_supernet(space, split)
    model.set_subnet(space.largest())
    largest = model.export().to(device).train()
    optimizer = torch.optim.AdamW(largest.trainable_parameters(), lr=1e-3)
    backbone = perturbed_supernet(space, split).to(device)  # the empty subnet: the backbone
    backbone.set_subnet(Subnet())
    backbone.requires_grad_(False)

    amp = device.type == "cuda"

    def step():
        for _ in range(steps):
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                loss = torch.nn.functional.cross_entropy(largest(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def floor():
        for _ in range(steps):
            xi = x.detach().requires_grad_(True)
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                out = backbone(xi)
            out.float().square().mean().backward()

    t_step, t_floor = timed(step, repeats, device), timed(floor, repeats, device)
    return {
        "largest_subnet": str(space.largest()),
        "img_s": {"largest": steps * batch / t_step, "floor": steps * batch / t_floor},
        "largest_over_floor": t_step / t_floor,
    }


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the results here")


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    results: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(device),
        "torch": torch.__version__,
    }
    split = random_split(256)
    for name in FAMILIES:
        space = load_space(name)
        results[name] = {
            "equivalence": equivalence(space, split, device, args.draws),
            "training": training(space, split, device),
            "step_cost": step_cost(space, split, device, args.repeats),
        }
        print(name, json.dumps(results[name]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0
