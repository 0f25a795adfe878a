"""ViT-B/16 on one accelerator (issue 10, item 6): supernet training images/s and model FLOP
utilisation in bf16, and from them the projected wall time of NOAH's full VTAB-1k protocol.

What runs is the pipeline's own code: ``nas.training.train.train`` (the supernet with a fresh random
subnet per batch, then a standalone winner) and ``evaluate_candidates`` (the search's scoring,
alone and with every candidate logged to MLflow as the search stage does), on the shipped
NOAH space (``search_spaces/noah_vtab.yaml``, ViT-B/16 with random weights: throughput does
not depend on them, and nothing is downloaded) and stand-in images of the right shape (random
224x224 RGB; the pixels do not change the speed). The protocol comes from
``experiments/noah_vtab.yaml``: its supernet epochs and batch, its evolution settings (the
number of candidates is counted by running the algorithm with random scores: duplicates and
over-budget candidates are never scored), its retraining epochs; VTAB-1k has 800 training and
200 validation images per dataset, 19 datasets.

FLOPs are counted by ``torch.utils.flop_counter`` on real training steps (matmuls, forward and
backward as executed: the frozen backbone's weight gradients are never computed, so a step
costs about two forward passes, not three); MFU divides the achieved FLOP rate by the
device's dense bf16 peak (``--peak-tflops`` for a device not in the table).

Run on a GPU:  python -m benchmarks vitb16-projection --device cuda --json FILE
A CPU smoke run of the same code (numbers meaningless):
               python -m benchmarks vitb16-projection --device cpu --train-images 8 --batch 4
                   --val-images 8 --candidates 2 --repeats 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import machine, timed
from nas.data.decode import DecodedSplit
from nas.families import build_prompted
from nas.families.prompted import PromptedModel
from nas.search import make_search
from nas.space.cost import subnet_params
from nas.space.search_space import SearchSpace, load_space
from nas.training.evaluate import evaluate_candidates
from nas.training.train import TrainConfig, autocast, train

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "experiments" / "noah_vtab.yaml"
VTAB_DATASETS, VTAB_TRAIN, VTAB_VAL = 19, 800, 200

#: dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets
PEAK_BF16_TFLOPS = {
    "H100 80GB HBM3": 989.4,  # SXM
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.4,
    "A100": 312.0,
    "L40S": 362.0,
}


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def stand_in(n: int, classes: int, size: int, seed: int) -> DecodedSplit:
    g = torch.Generator().manual_seed(seed)
    return DecodedSplit(
        name="stand-in",
        images=torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
        labels=torch.randint(0, classes, (n,), generator=g),
        num_classes=classes,
        class_names=None,
        source="random pixels",
    )


def protocol() -> dict:
    """The stage settings of the shipped NOAH VTAB-1k spec."""
    stages = yaml.safe_load(SPEC.read_text())["stages"]
    return {
        "supernet_epochs": stages["supernet"]["epochs"],
        "batch": stages["supernet"]["batch_size"],
        "search": stages["search"]["options"],
        "retrain_epochs": stages["retrain"]["epochs"],
        "retrain_top_k": stages["retrain"].get("top_k", 1),
    }


def candidates_scored(space: SearchSpace, options: dict) -> int:
    """How many candidates one evolutionary search scores, counted by running it."""
    algorithm = make_search("evolution", space, seed=0, **options)
    rng = random.Random(0)
    count = 0

    def score(batch):
        nonlocal count
        count += len(batch)
        return [rng.random() for _ in batch]

    algorithm.run(score)
    return count


def flops_per_image(
    model: PromptedModel, space: SearchSpace, batch: int, device, draws: int
) -> float:
    """Matmul FLOPs of a training step per image, averaged over ``draws`` random subnets."""
    rng = random.Random(1)
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    total = 0
    model.train()
    for _ in range(draws):
        model.set_subnet(space.sample(rng))
        counter = FlopCounterMode(display=False)
        with counter:
            with autocast(device):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
        model.zero_grad(set_to_none=True)
        total += counter.get_total_flops()
    return total / draws / batch


def tracking_overhead(supernet, space, val_split, mean, std, n, repeats, device) -> dict:
    """The search stage's loop without the algorithm: candidates scored a generation (25) at a
    time, each logged as an MLflow child run (sqlite, the pipeline's CandidateLogger), against
    the same scoring untracked. Run at n and 4n candidates: the difference is the per-candidate
    cost, free of the logging process's start-up."""
    from nas.tracking.candidates import CandidateLogger, logging_processes
    from nas.tracking.runs import Tracker

    cpus = yaml.safe_load(SPEC.read_text())["resources"]["cpus"]

    rng = random.Random(3)
    subnets = []
    while len(subnets) < 4 * n:
        s = space.sample(rng)
        if space.admits(s) and s not in subnets:
            subnets.append(s)
    keys = itertools.count()

    def scored(count: int, tracker=None, parent=None):
        def run():
            logger = None
            if tracker is not None:
                logger = CandidateLogger(tracker, parent, {}, logging_processes(cpus))
            for i in range(0, count, 25):
                chunk = subnets[i : min(i + 25, count)]
                scores = evaluate_candidates(supernet, chunk, val_split, mean=mean, std=std)
                for s, acc in zip(chunk, scores, strict=True):
                    if logger is not None:
                        logger.log(str(next(keys)), str(s), {"subnet": str(s)}, {"val_acc": acc})
            if logger is not None:
                logger.close()

        return run

    with tempfile.TemporaryDirectory() as tmp:
        tracker = Tracker(f"sqlite:///{tmp}/mlflow.db", "projection")
        parent = tracker.run("search", {"stage": "search"})
        t = {
            "pure": timed(scored(4 * n), repeats, device),
            "tracked": timed(scored(n, tracker, parent), repeats, device),
            "tracked_4x": timed(scored(4 * n, tracker, parent), repeats, device),
        }
    pure = t["pure"] / (4 * n)
    marginal = (t["tracked_4x"] - t["tracked"]) / (3 * n)
    return {
        "candidates": [n, 4 * n],
        "logging_processes": logging_processes(cpus),
        "s_per_candidate": {"untracked": pure, "tracked_marginal": marginal},
        "fixed_s": t["tracked"] - n * marginal,
        "per_candidate_overhead": marginal / pure - 1,
    }


def projection(proto: dict, space: SearchSpace, results: dict, val_images: int) -> dict:
    """The protocol's hours per dataset and over VTAB-1k's 19, from the measured rates."""
    n_candidates = candidates_scored(space, proto["search"])
    per_dataset = {
        "supernet_h": proto["supernet_epochs"] * VTAB_TRAIN / results["supernet"]["img_s"] / 3600,
        "search_h": n_candidates
        / results["search"]["candidates_per_s"]
        * (VTAB_VAL / val_images)
        / 3600,
        "retrain_h": proto["retrain_top_k"]
        * proto["retrain_epochs"]
        * (VTAB_TRAIN + VTAB_VAL)
        / results["retrain"]["img_s"]
        / 3600,
    }
    return {
        "protocol": {**proto, "candidates_per_search": n_candidates, "datasets": VTAB_DATASETS},
        "per_dataset_h": per_dataset,
        "all_19_datasets_h": {k: v * VTAB_DATASETS for k, v in per_dataset.items()},
        "total_h": VTAB_DATASETS * sum(per_dataset.values()),
    }


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--train-images", type=int, default=VTAB_TRAIN, help="per timed epoch")
    parser.add_argument("--val-images", type=int, default=VTAB_VAL)
    parser.add_argument("--batch", type=int, default=None, help="default: the spec's")
    parser.add_argument("--candidates", type=int, default=16, help="scored per timed run")
    parser.add_argument(
        "--tracked-candidates",
        type=int,
        default=48,
        help="scored with MLflow logging, at this count and 4x it (0: skip)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flop-draws", type=int, default=4)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--json", help="write the results here")


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    proto = protocol()
    batch = args.batch or proto["batch"]
    space = load_space("noah_vtab")
    classes = 100
    train_split = stand_in(args.train_images, classes, 224, 0)
    torch.manual_seed(0)
    supernet = build_prompted(space.backbone, space, train_split).to(device)
    val_split = stand_in(args.val_images, classes, 224, 1)
    mean, std = space.backbone.normalisation()
    results: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(device),
        "torch": torch.__version__,
        "setting": f"ViT-B/16 (random weights), space noah_vtab, batch {batch}, bf16 autocast "
        f"on GPU, stand-in {args.train_images} train / {args.val_images} val images 224x224",
    }

    # 1. supernet training: one epoch of the pipeline's loop, a fresh subnet per batch
    def supernet_epoch():
        cfg = TrainConfig(epochs=1, batch_size=batch, lr=5e-4)
        train(supernet, train_split, cfg, mean=mean, std=std, sample_subnet=space.sample)

    t_super = timed(supernet_epoch, args.repeats, device)
    super_img_s = len(train_split) / t_super
    flops = flops_per_image(supernet, space, min(batch, 8), device, args.flop_draws)
    peak = peak_tflops(device, args.peak_tflops)
    results["supernet"] = {
        "img_s": super_img_s,
        "train_step_gflops_per_image": flops / 1e9,
        "achieved_tflops": flops * super_img_s / 1e12,
        "peak_bf16_tflops": peak,
        "mfu": flops * super_img_s / (peak * 1e12) if peak else None,
    }
    print(json.dumps({"supernet": results["supernet"]}), flush=True)

    # 2. search: candidates scored on the validation split
    rng = random.Random(2)
    subnets = []
    while len(subnets) < args.candidates:
        s = space.sample(rng)
        if space.admits(s) and s not in subnets:
            subnets.append(s)

    def score():
        evaluate_candidates(supernet, subnets, val_split, mean=mean, std=std)

    search = {"candidates_per_s": len(subnets) / timed(score, args.repeats, device)}
    if args.tracked_candidates:
        search["tracking"] = tracking_overhead(
            supernet, space, val_split, mean, std, args.tracked_candidates, args.repeats, device
        )
    results["search"] = search
    print(json.dumps({"search": search}), flush=True)

    # 3. retraining: the in-budget subnet with the most parameters, standalone
    winner = max(subnets, key=lambda s: subnet_params(s, space.geometry))
    supernet.set_subnet(winner)
    alone = supernet.export().to(device)

    def retrain_epoch():
        cfg = TrainConfig(epochs=1, batch_size=batch, lr=1e-3)
        train(alone, train_split, cfg, mean=mean, std=std)

    t_re = timed(retrain_epoch, args.repeats, device)
    results["retrain"] = {"subnet": str(winner), "img_s": len(train_split) / t_re}
    print(json.dumps({"retrain": results["retrain"]}), flush=True)

    # 4. the protocol's projected wall time on this one device
    results["projection"] = projection(proto, space, results, args.val_images)
    print(json.dumps({"projection": results["projection"]}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0
