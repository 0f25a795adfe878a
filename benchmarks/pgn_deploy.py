"""PGN trained in token space, deployed as pixels (issue 11), and its training-step cost.

On a mini-VTAB task with the committed ``vit_fmnist`` backbone: a PGN subnet with
``placement: border`` is trained on train800val200 and tested once, three ways:
- token space (the trained model itself);
- pixels through the least-squares inverse of the patch embedding, neither clipped nor
  quantised (what the inverse's conditioning alone costs: vit_fmnist's patch embedding maps 49
  pixels to 192 dimensions, so it is not invertible);
- pixels clipped to [0, 1] and quantised to 8 bits, pasted into the image that an unmodified
  copy of the backbone (with the trained head) classifies: the real deployment.
It also times a PGN training step against the frozen backbone's own forward + backward (the
floor of every prompt method), interleaved in one run.

Run: python -m benchmarks pgn-deploy [--task digits] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine, sync
from nas.core.yamlio import parse_yaml
from nas.data.decode import decode_split
from nas.data.lists import read_vtab
from nas.data.loader import TensorLoader
from nas.data.mini_vtab import prepare
from nas.families import build_prompted
from nas.families.vit.model import PromptedViT
from nas.interop.inversion import PatchInverse, RGBPrompts
from nas.space.search_space import parse_space
from nas.training.evaluate import evaluate
from nas.training.train import TrainConfig, train
from trainers.optim import build_optimizer

SPACE = """
backbone: vit_fmnist
modules:
  pgn: {prompts: [8], library: [64], generators: [resnet10], resolutions: [28], placement: border}
"""


@torch.no_grad()
def accuracy(classify, data, mean, std) -> float:
    correct = 0
    for x, y in TensorLoader(data, 256, mean, std):
        correct += (classify(x).argmax(1) == y).sum().item()
    return correct / len(data)


def step_cost(model, backbone, data, mean, std, repeats: int) -> dict:
    device = torch.device("cpu")
    loader = TensorLoader(data, 64, mean, std, shuffle=True, drop_last=True)
    batches = [b for _, b in zip(range(6), loader, strict=False)]
    optimizer = build_optimizer(model, 1e-3)

    def pgn_steps():
        model.train()
        for x, y in batches:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def floor():
        for x, _ in batches:
            x = x.detach().requires_grad_(True)
            backbone(x).square().mean().backward()

    times: dict[str, list[float]] = {"pgn": [], "floor": []}
    pgn_steps(), floor()  # warm-up
    for _ in range(repeats):
        for name, fn in (("pgn", pgn_steps), ("floor", floor)):
            sync(device)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    t = {k: statistics.median(v) for k, v in times.items()}
    images = len(batches) * 64
    return {
        "img_s": {k: images / v for k, v in t.items()},
        "pgn_over_floor": t["pgn"] / t["floor"],
    }


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="digits")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the results here")


def run(args: argparse.Namespace) -> int:
    space = parse_space(parse_yaml(SPACE))
    mean, std = space.backbone.normalisation()
    with tempfile.TemporaryDirectory() as tmp:
        prepare(Path(tmp), (args.task,), log=lambda *_: None)
        splits = read_vtab(Path(tmp) / args.task)
        data = {k: decode_split(splits[k], 28, 1) for k in ("trainval", "test")}
    classes = data["trainval"].num_classes
    subnet = space.largest()
    torch.manual_seed(0)
    backbone = space.backbone.create(classes)
    host = copy.deepcopy(backbone).eval()  # an unmodified copy, as a host would run it
    model = PromptedViT.for_subnet(backbone, subnet, space.options(), space.backbone)
    cost = step_cost(
        model, copy.deepcopy(host).requires_grad_(False), data["trainval"], mean, std, args.repeats
    )
    torch.manual_seed(0)
    model = build_prompted(space.backbone, space, data["trainval"], subnet=subnet)
    started = time.time()
    train(model, data["trainval"], TrainConfig(epochs=args.epochs, lr=args.lr), mean=mean, std=std)
    model.eval()
    host.load_state_dict(model.backbone.state_dict())  # the trained head; the rest unchanged
    inverse = PatchInverse(model.backbone)
    library = model.prompt_modules["pgn"].library.detach()
    least_squares = RGBPrompts(model, mean, std, bits=None, clip=False).eval()
    deployed = RGBPrompts(model, mean, std).eval()
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(torch.device("cpu")),
        "task": args.task,
        "subnet": str(subnet),
        "epochs": args.epochs,
        "train_s": time.time() - started,
        "patch_embedding_rank": inverse.rank,
        "library_reconstruction_error": inverse.reconstruction_error(library),
        "test_acc": {
            "token_space": evaluate(model, data["test"], mean=mean, std=std),
            "pixels_least_squares": accuracy(
                lambda x: host(least_squares(x)), data["test"], mean, std
            ),
            "pixels_8bit_clipped": accuracy(lambda x: host(deployed(x)), data["test"], mean, std),
            "host_without_prompts": accuracy(host, data["test"], mean, std),
        },
        "step_cost": cost,
        "test_images": len(data["test"]),
        "trainable_params": model.num_params()["modules"],
    }
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0
