"""The ``nas`` command."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from nas.cli_space import (
    cmd_space_show,
    cmd_space_validate,
    cmd_subnet_import_noah,
    cmd_subnet_show,
)
from nas.data.dataset_formats import FORMATS
from nas.errors import NasError
from nas.pipeline.console import MODES
from nas.space import DEFAULT_SPACE


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from nas.data.mini_vtab import DEFAULT_TASKS, prepare

    if args.benchmark != "mini-vtab":
        raise NasError(f"unknown benchmark {args.benchmark!r}; available: mini-vtab")
    tasks = list(args.tasks or DEFAULT_TASKS)
    if args.with_elpv and "elpv" not in tasks:
        tasks.append("elpv")
        print("note: ELPV's data licence is CC BY-NC-SA 4.0 (non-commercial use only)")
    _folder_out(args.out)
    prepare(args.out, tasks, seed=args.seed, test_size=args.test_size)
    print(f"wrote {len(tasks)} tasks to {args.out} (manifest: {args.out}/manifest.json)")
    return 0


def cmd_data_few_shot(args: argparse.Namespace) -> int:
    from nas.data.fewshot import write_few_shot_splits

    if args.out is not None:
        _folder_out(args.out)
    info = write_few_shot_splits(
        args.images,
        args.out,
        shots=args.shots,
        seeds=args.seeds,
        val_per_class=args.val_per_class,
        test_fraction=args.test_fraction,
    )
    print(
        f"wrote {info['files']} list files: {info['classes']} classes, "
        f"{info['val']} val and {info['test']} test images"
    )
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from nas.data.dataset_formats import dataset_format
    from nas.data.decode import decode_split

    dup = "drop" if args.drop_duplicates else "error"
    splits = dataset_format(args.format).splits_to_check(
        Path(args.folder), shots=args.shots, split_seed=args.seed, duplicates=dup
    )
    for name, split in splits.items():
        decode_split(split, 32, 3)  # every image must decode
        print(f"{name:<9} {len(split):>6} images, {split.num_classes} classes  ({split.source})")
    listed = Path(args.folder) / "targets"
    source = splits.get("test") or next(iter(splits.values()))
    if listed.is_dir():  # domain-generalisation targets (a spec's targets without a list)
        from nas.data.formats import read_target
        from nas.pipeline.preflight import check_targets

        for path in sorted(listed.glob("*.txt")):
            target = read_target(path, Path(args.folder), path.stem, source.num_classes,
                                 source.class_names, duplicates=dup)  # fmt: skip
            check_targets(Path(args.folder).name, splits, {path.stem: target})
            decode_split(target, 32, 3)
            classes = len({e.label for e in target.entries})
            print(f"target {path.stem:<12} {len(target):>6} images, {classes} of the "
                  f"{source.num_classes} classes  ({path})")  # fmt: skip
    return 0


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


def cmd_relocate(args: argparse.Namespace) -> int:
    from nas.pipeline.layout import relocate_output

    folder = Path(args.folder)
    if not (folder / "output_id.json").is_file():
        raise NasError(f"{folder}: not a run folder of this version (no output_id.json)")
    said = relocate_output(folder, own_store=True)  # a store inside the folder is its own
    print("\n".join(said) or f"{folder} has not moved since it last ran")
    return 0


def cmd_report(args: argparse.Namespace) -> int:

    from nas.pipeline.reports import methods_markdown, results_from_mlflow, results_markdown

    source = args.source
    if args.markdown:
        _check_writable_file(Path(args.markdown), "--markdown")
    is_uri = "://" in source or source.startswith("sqlite:")
    if args.output and not is_uri:
        raise NasError(f"--output chooses among an MLflow experiment's output folders: give a "
                       f"tracking URI, not {source}")  # fmt: skip
    if is_uri:
        results = results_from_mlflow(_mlflow_source(source), args.experiment, args.output)
    else:
        path = Path(source)
        if path.is_dir():
            path = path / "results.json"
            if not path.is_file():
                raise NasError(f"{path}: no results yet (has `nas run` finished in {source}?)")
        elif not path.is_file():
            raise NasError(f"{source}: no such run folder or results file")
        elif _is_sqlite(path):
            raise NasError(
                f"{source} is an MLflow sqlite store: give it as a URI, sqlite:///{path.resolve()}"
            )
        results = _read_results(path)
    text = methods_markdown(results) if args.by_method else results_markdown(results)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    for line in _ui_links(source, results, is_uri):
        # on stderr: what stdout holds is the table (`nas report ... > table.md`)
        print(line, file=sys.stderr)
    return 0


def _ui_links(source: str, results: dict, is_uri: bool) -> list[str]:
    """The MLflow UI pages of the run (its retrained models; its stage runs), where its store
    is known."""
    from nas.pipeline.reports import ui_links

    rows = results["rows"]
    if is_uri:
        outputs = {r.get("output_id") for r in rows}
        if len(outputs) != 1 or None in outputs or "experiment_id" not in results:
            return []  # runs from before output ids
        return ui_links(_mlflow_source(source), results["experiment_id"], outputs.pop())
    folder = Path(source) if Path(source).is_dir() else Path(source).parent
    if not (folder / "spec.yaml").is_file() or not (folder / "output_id.json").is_file():
        return []  # a results file alone, or a run from before output ids
    from nas.pipeline.layout import output_id
    from nas.spec import load_spec
    from nas.tracking import Tracker

    spec = load_spec(folder / "spec.yaml", output=folder, check_data=False)
    found = Tracker.client_for(spec.tracking_uri).get_experiment_by_name(spec.mlflow_experiment)
    if found is None:
        return []
    return ui_links(spec.tracking_uri, found.experiment_id, output_id(folder))


def _is_sqlite(path) -> bool:
    with open(path, "rb") as f:
        return f.read(16) == b"SQLite format 3\x00"


def _has_mlflow_tables(path) -> bool:
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.Error:
        return False
    return {"experiments", "runs"} <= names


def _check_writable_file(path, option: str) -> None:
    """A file this command will write: its folder must exist and it must not be a folder."""
    if path.is_dir():
        raise NasError(f"{option} {path} is a folder; give a file path")
    if not path.parent.is_dir():
        raise NasError(f"{option} {path}: folder {path.parent} does not exist")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise NasError(f"{option} {path}: not writable by this user")


def _read_results(path) -> dict:
    """A run's results.json, or one clear error."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NasError(f"{path}: not a results file of `nas run` ({exc})") from None
    if not isinstance(results, dict) or not isinstance(results.get("rows"), list):
        raise NasError(f"{path}: not a results file of `nas run` (no 'rows' list)")
    for row in results["rows"]:  # rows written before roles were recorded: read from labels
        if isinstance(row, dict) and "role" not in row:
            label = str(row.get("label", ""))
            row["role"] = (
                "baseline"
                if label.startswith("baseline-")
                else "searched"
                if label == "rank1"
                else "searched (not reported)"
            )
    return results


def _mlflow_source(uri: str) -> str:
    """A tracking URI `nas report` can read without creating anything or waiting on a dead
    server: a known scheme, an existing sqlite file that is a database, a server answering."""

    from nas.tracking import probe_server, uri_problem

    problem = uri_problem(uri)
    if problem:
        raise NasError(problem)
    if uri.startswith("sqlite:"):
        # sqlite:///relative.db, sqlite:////absolute.db (SQLAlchemy's form)
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise NasError(f"{uri}: no such MLflow store ({path} does not exist)")
        if not _is_sqlite(path):
            raise NasError(f"{uri}: {path} is not an sqlite database")
        if not _has_mlflow_tables(path):  # MLflow would add its tables to another database
            raise NasError(f"{uri}: {path} is an sqlite database but not an MLflow store")
    problem = probe_server(uri)
    if problem:
        raise NasError(f"{uri}: {problem}")
    return uri


def _at_least(low: int):
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


def _fraction(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {value:g}")
    return value


def _folder_out(path, option: str = "--out") -> None:
    """A folder this command writes into: not a file, nor below one."""

    path = Path(path)
    first = next(p for p in (path, *path.parents) if p.exists())
    if not first.is_dir():
        raise NasError(f"{option} {path}: {first} is a file, not a folder")
    if not os.access(first, os.W_OK | os.X_OK):
        raise NasError(f"{option} {path}: {first} is not writable by this user")


def add_report_commands(commands) -> None:
    """`nas report` and `nas relocate`: reading a finished run, and moving one."""
    report = commands.add_parser("report", help="print the results table of a run")
    report.add_argument("source", help="a run's output folder, or an MLflow tracking URI")
    report.add_argument("--experiment", help="the MLflow experiment (with a URI)")
    report.add_argument(
        "--output",
        help="with a URI whose experiment holds several output folders' runs: whose (the "
        "folder, or its output id)",
    )
    report.add_argument("--markdown", help="also write the table to this file")
    report.add_argument(
        "--by-method",
        action="store_true",
        help="methods side by side (mean ± std over seeds, group means, costs)",
    )
    report.set_defaults(func=cmd_report)
    relocate = commands.add_parser(
        "relocate",
        help="after moving or copying a run folder: point its MLflow store at its own "
        "artifacts (a copy also gets its own output id); `nas run` does this by itself",
    )
    relocate.add_argument("folder", help="the run folder, where it is now")
    relocate.set_defaults(func=cmd_relocate)


def add_subnet_commands(commands) -> None:
    """`nas subnet show` and `nas subnet import-noah`."""
    subnet = commands.add_parser("subnet", help="inspect a subnet written in YAML")
    subnet_cmds = subnet.add_subparsers(dest="subnet_command", required=True, metavar="ACTION")
    sub_show = subnet_cmds.add_parser("show", help="costs of a subnet and whether a space has it")
    sub_show.add_argument("subnet", help="a subnet YAML file")
    sub_show.add_argument(
        "--space",
        default=DEFAULT_SPACE,
        help=f"the search space it belongs to (default: {DEFAULT_SPACE})",
    )
    sub_show.add_argument("--json", action="store_true", help="print as JSON")
    sub_show.set_defaults(func=cmd_subnet_show)
    noah = subnet_cmds.add_parser(
        "import-noah",
        help="read one of NOAH's released subnet configs (its RETRAIN section)",
        description="Read a NOAH subnet config (experiments/NOAH/subnet/*/*.yaml in NOAH's "
        "code) and show it as 'nas subnet show' does; --out writes it as a subnet YAML that "
        "specs (stages.retrain.baselines) and 'nas subnet show' read.",
    )
    noah.add_argument("file", help="a NOAH subnet config (YAML with a RETRAIN section)")
    noah.add_argument("--out", help="also write the subnet here as this platform's YAML")
    noah.add_argument("--force", action="store_true", help="overwrite --out if it differs")
    noah.add_argument(
        "--space", default="noah_vtab", help="the space to check it against (default: noah_vtab)"
    )
    noah.add_argument("--json", action="store_true", help="print as JSON")
    noah.set_defaults(func=cmd_subnet_import_noah)


def cmd_export(args: argparse.Namespace) -> int:
    from nas.export import export

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
    space = commands.add_parser("space", help="inspect and validate search spaces")
    space_cmds = space.add_subparsers(dest="space_command", required=True, metavar="ACTION")
    show = space_cmds.add_parser("show", help="summarise a search space")
    show.add_argument(
        "space",
        nargs="?",
        default=DEFAULT_SPACE,
        help=f"a YAML file or a shipped space name (default: {DEFAULT_SPACE})",
    )
    show.add_argument("--json", action="store_true", help="print the summary as JSON")
    show.set_defaults(func=cmd_space_show)
    validate = space_cmds.add_parser("validate", help="check search space files")
    validate.add_argument("files", nargs="+", help="YAML files or shipped space names")
    validate.set_defaults(func=cmd_space_validate)

    add_subnet_commands(commands)
    add_export_command(commands)

    data = commands.add_parser("data", help="prepare and check datasets")
    data_cmds = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prep = data_cmds.add_parser("prepare", help="write the offline mini-VTAB benchmark")
    prep.add_argument("benchmark", help="mini-vtab")
    prep.add_argument("--out", required=True, help="output folder")
    prep.add_argument("--tasks", nargs="+", help="a subset of the tasks (default: all but elpv)")
    prep.add_argument(
        "--with-elpv",
        action="store_true",
        help="add the ELPV solar-cell task (licence CC BY-NC-SA: non-commercial)",
    )
    prep.add_argument("--seed", type=_at_least(0), default=0)
    prep.add_argument(
        "--test-size", type=_at_least(1), default=2000, help="largest test split per task"
    )
    prep.set_defaults(func=cmd_data_prepare)
    few = data_cmds.add_parser("few-shot", help="write few-shot splits for an ImageFolder")
    few.add_argument("images", help="an ImageFolder: IMAGES/<class>/<image>")
    few.add_argument(
        "--out",
        help="the dataset folder to write annotations/ into (default: the parent of IMAGES)",
    )
    few.add_argument("--shots", type=_at_least(1), nargs="+", default=[1, 2, 4, 8, 16])
    few.add_argument("--seeds", type=_at_least(0), nargs="+", default=[0, 1, 2])
    few.add_argument("--val-per-class", type=_at_least(1), default=4)
    few.add_argument("--test-fraction", type=_fraction, default=0.2)
    few.set_defaults(func=cmd_data_few_shot)
    check = data_cmds.add_parser("check", help="read and decode every image of a dataset")
    check.add_argument("folder")
    check.add_argument("--format", choices=sorted(FORMATS), default="vtab")
    check.add_argument("--shots", type=_at_least(1), default=16)
    check.add_argument("--seed", type=_at_least(0), default=0)
    check.add_argument(
        "--drop-duplicates",
        action="store_true",
        help="read lists that repeat entries (NOAH's released few-shot lists)",
    )
    check.set_defaults(func=cmd_data_check)
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


if __name__ == "__main__":
    sys.exit(main())
