"""A finished run's PGN models deployed as pixels (issue 11), beside their token-space accuracy.

Every retrained model of the run whose subnet is PGN alone with ``placement: border`` (the
``pgn`` baseline of ``experiments/benchmark_mini_vtab_pgn.yaml``; a searched winner too, if
the search chose PGN alone) is tested once more on its test split, as an unmodified copy of
its backbone with the trained head sees it: the generated prompts turned into 8-bit pixels
(``nas.interop.inversion.RGBPrompts``: the least-squares inverse of the patch embedding, clipped to
[0, 1] and quantised) pasted over the image's border patches. The token-space accuracy is
recomputed from the saved model and must equal the one the run recorded.

Run: python -m benchmarks pgn-deployed experiments/benchmark_mini_vtab_pgn.yaml \
         --output /work/bench-full/pgn [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import machine
from nas import families
from nas.data.loader import TensorLoader
from nas.interop.inversion import RGBPrompts
from nas.pipeline import context, layout
from nas.spec.experiment import load_spec
from nas.training.evaluate import evaluate


@torch.no_grad()
def deployed_accuracy(model, test, mean, std) -> float:
    """Test accuracy of an unmodified copy of the model's backbone (trained head included)
    given the images with the PGN prompts pasted in as 8-bit pixels."""
    host = model.backbone_spec.create(test.num_classes)
    host.load_state_dict(model.backbone.state_dict())  # plain timm: no hooks, no modules
    host.eval()
    pixels = RGBPrompts(model, mean, std).eval()
    correct = 0
    for x, y in TensorLoader(test, 256, mean, std):
        correct += (host(pixels(x)).argmax(1) == y).sum().item()
    return correct / len(test)


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec")
    parser.add_argument("--output", required=True, help="the run's output folder")
    parser.add_argument("--json", help="write the results here")


def run(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec, output=args.output)
    mean, std = spec.backbone.normalisation()
    rows = []
    for ds in spec.datasets:
        test = context.load_splits(spec, ds, ("test",))["test"]
        for seed in spec.seeds:
            folder = layout.run_layout(spec).retrain(ds.key, seed, "x").parent
            for done in sorted(folder.glob("*/done.json")):
                model = families.load(done.parent / "model").eval()
                data = model.subnet.to_data()
                if set(data) != {"pgn"} or data["pgn"].get("placement") != "border":
                    continue
                recorded = json.loads(done.read_text())["test_acc"]
                token = evaluate(model, test, mean=mean, std=std)
                rows.append(
                    {
                        "dataset": ds.key,
                        "seed": seed,
                        "label": done.parent.name,
                        "subnet": str(model.subnet),
                        "test_acc_token_space": token,
                        "recorded_test_acc": recorded,
                        "test_acc_pixels_8bit": deployed_accuracy(model, test, mean, std),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    if not rows:
        raise SystemExit(f"{args.output}: no retrained PGN-only model with placement: border")
    mismatched = [r for r in rows if abs(r["test_acc_token_space"] - r["recorded_test_acc"]) > 0]
    print("| dataset | model | token space | pixels (8-bit) | difference |")
    print("|---|---|---|---|---|")
    summary = {}
    for key in dict.fromkeys((r["dataset"], r["label"]) for r in rows):
        group = [r for r in rows if (r["dataset"], r["label"]) == key]

        def stat(name: str, group=group) -> str:
            values = [100 * r[name] for r in group]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.1f} ± {sd:.1f}"

        diff = statistics.mean(
            100 * (r["test_acc_pixels_8bit"] - r["test_acc_token_space"]) for r in group
        )
        summary[f"{key[0]}/{key[1]}"] = {
            "token": stat("test_acc_token_space"),
            "pixels": stat("test_acc_pixels_8bit"),
            "difference": diff,
            "seeds": len(group),
        }
        print(
            f"| {key[0]} | {key[1]} | {stat('test_acc_token_space')} | "
            f"{stat('test_acc_pixels_8bit')} | {diff:+.1f} |"
        )
    if mismatched:
        print(f"WARNING: {len(mismatched)} model(s) do not reproduce their recorded accuracy")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "date": time.strftime("%Y-%m-%d"),
                    "machine": machine(torch.device("cpu")),
                    "run": str(args.output),
                    "rows": rows,
                    "summary": summary,
                    "reproduced_recorded_accuracy": not mismatched,
                },
                indent=2,
            )
        )
    return 0
