"""The ``nas`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from nas.cli.data import add_data_commands
from nas.cli.report import add_report_commands
from nas.cli.space import add_space_commands, add_subnet_commands
from nas.core.errors import NasError
from nas.pipeline.console import MODES


def cmd_run(args: argparse.Namespace) -> int:
    from nas.pipeline.console import choose_mode, quiet_environment, say

    # Before Ray is imported: its worker prefix is read then (nas.pipeline.console).
    quiet_environment()
    if args.progress == "live" and not sys.stdout.isatty():
        raise NasError(
            "--progress live redraws one view in place, which needs a terminal; the output "
            "goes to a file or a pipe here: use --progress plain (or leave the flag out)"
        )
    if args.progress:
        os.environ["NAS_PROGRESS"] = args.progress
    choose_mode()  # a bad NAS_PROGRESS is told now, not when the first stage starts
    # Importing torch, Ray and MLflow, checking the inputs and starting Ray take 10-30 s:
    # the first line comes before them.
    say(f"nas run {args.spec}: checking the spec, data and tracking store, then starting Ray")

    from nas.pipeline.driver import run_experiment
    from nas.pipeline.reports import results_markdown

    try:
        results = run_experiment(args.spec, output=args.output, new=args.new)
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM (`ray job stop`)
        print("nas: stopped; run the same command again to continue", file=sys.stderr)
        return 130
    print(results_markdown(results))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from nas.interop.export import export

    for path in export(args.model, args.format, args.out, force=args.force):
        print(path)
    return 0


def add_export_command(commands) -> None:
    """`nas export`: a saved subnet as a PEFT adapter or a timm checkpoint."""
    exp = commands.add_parser(
        "export",
        help="write a trained subnet as a PEFT LoRA adapter or a timm checkpoint",
        description="Write a saved subnet folder (a retrained model: retrain/<run>/<label>/"
        "model, or its 'model' artifact in MLflow) for other tools: --format peft writes a "
        "LoRA adapter folder that peft.PeftModel.from_pretrained loads onto the timm model; "
        "--format timm folds LoRA into the qkv weights and writes config.json + "
        "model.safetensors (timm.create_model('local-dir:OUT', pretrained=True)). Subnets "
        "with VPT, Adapter, PGN or UPT layers cannot be expressed in either.",
    )
    exp.add_argument("model", help="a saved subnet folder (subnet.yaml + weights.safetensors)")
    exp.add_argument("--format", required=True, choices=["peft", "timm"])
    exp.add_argument("--out", required=True, help="the folder to write")
    exp.add_argument("--force", action="store_true", help="write into a non-empty folder")
    exp.set_defaults(func=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nas", description="Search prompt modules for frozen vision transformers."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run an experiment spec (supernet, search, retrain)")
    run.add_argument("spec", help="an experiment YAML, e.g. experiments/quickstart.yaml")
    run.add_argument("--output", help="output folder (default: the spec's 'output')")
    run.add_argument(
        "--new",
        action="store_true",
        help="if the output folder holds another spec's run, run in OUTPUT-<spec hash> beside "
        "it (the same command again continues there)",
    )
    run.add_argument(
        "--progress",
        choices=MODES,
        help="live: one view redrawn in place; plain: a timestamped line per event; "
        "auto (default, or NAS_PROGRESS): live in a terminal, plain otherwise",
    )
    run.set_defaults(func=cmd_run)
    add_report_commands(commands)
    add_space_commands(commands)
    add_subnet_commands(commands)
    add_export_command(commands)

    add_data_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except NasError as exc:
        print(f"nas: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file a command writes or reads: read-only, missing, full disk
        if exc.filename is None:
            raise
        print(f"nas: error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nas: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `nas space show | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
