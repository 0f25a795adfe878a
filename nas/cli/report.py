"""`nas report` (a finished run's table, from its folder or an MLflow store, with the UI's
links) and `nas relocate` (a moved or copied run folder)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from nas.cli.args import check_writable_file
from nas.core.errors import NasError


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
        check_writable_file(Path(args.markdown), "--markdown")
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
    from nas.spec.experiment import load_spec
    from nas.tracking.runs import Tracker

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

    from nas.tracking.runs import probe_server, uri_problem

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
