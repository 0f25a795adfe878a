"""``python -m benchmarks EXPERIMENT [options]``: one subcommand per experiment module. Each
module defines ``arguments(parser)`` and ``run(args) -> int``; only the chosen one is imported
(they import torch, some Ray), so ``--help`` answers at once."""

from __future__ import annotations

import argparse
import importlib
import sys

#: Subcommand -> (module, what it measures).
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "controls": ("controls", "the search against random search and the largest subnet (1 seed)"),
    "fidelity": ("fidelity", "Kendall's tau of supernet variants against the ground truth"),
    "value": ("value", "the searched winner against its controls, retrained and tested once"),
    "ground-truth": ("ground_truth", "subnets trained alone over seeds: the ranking's truth"),
    "speed": ("speed", "training steps/s, search candidates/s, Ray and MLflow overheads"),
    "trust": ("search_trust", "the pipeline's own runs: searched vs random search and subnets"),
    "reachability": ("reachability", "how often the search's moves reach its space's best"),
    "loader-vs-step": ("loader_vs_step", "the data loader's time against a training step"),
    "pgn-deploy": ("pgn_deploy", "PGN inverted to input-space prompts: accuracy and speed"),
    "pgn-deployed": ("pgn_deployed", "a pipeline run's PGN winners deployed as RGB prompts"),
    "quickstart-time": ("quickstart_time", "wall time of the README's quickstart"),
    "cli-time": ("cli_time", "wall time and heavy imports of the CLI's light commands"),
    "ray-trial-cost": ("ray_trial_cost", "the cost of one Ray Tune trial over a plain call"),
    "vitb16-projection": ("vitb16_projection", "ViT-B/16 throughput, projected to VTAB-1k"),
    "cuda-check": ("cuda_check", "the pipeline's training and search on a GPU"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    listing = "\n".join(f"  {name:<18} {what}" for name, (_, what) in EXPERIMENTS.items())
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog=f"experiments:\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("experiment", choices=EXPERIMENTS, metavar="EXPERIMENT")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the experiment's (--help)")
    top = parser.parse_args(argv[:1])
    module = importlib.import_module(f"benchmarks.{EXPERIMENTS[top.experiment][0]}")
    doc = module.__doc__ or ""
    sub = argparse.ArgumentParser(
        prog=f"python -m benchmarks {top.experiment}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.arguments(sub)
    return module.run(sub.parse_args(argv[1:]))


if __name__ == "__main__":
    raise SystemExit(main())
