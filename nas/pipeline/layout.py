"""Where a run keeps its state (``RunLayout``: every path of a run folder), per stage (each
dataset key and seed: ``<ds>-seed<k>``), and how it is written: atomically, so a reader never
sees half a file and a kill never leaves one::

    hparams/<ds>/<method>/done.json             a sweep's winner (one sweep for all seeds; a
                                                searched subnet's own sweep: its seed only)
    supernet/<ds>-seed<k>/state.pt              training state every checkpoint_every epochs
    supernet/<ds>-seed<k>/supernet.safetensors  final module and head weights; done.json
    search/<ds>-seed<k>/candidates.jsonl        every evaluated candidate, appended as scored
    search/<ds>-seed<k>/candidates.csv          the table of all candidates; done.json
    verify/<ds>-seed<k>/<label>.json            a verified candidate's epochs so far
    verify/<ds>-seed<k>/done.json               the candidates ranked on val (stages.verify)
    retrain/<ds>-seed<k>/<label>/model/         subnet.yaml + weights.safetensors; done.json
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas.core.errors import NasError
from nas.core.jsonio import read_json, write_json

if TYPE_CHECKING:
    from nas.spec.experiment import ExperimentSpec

#: The file a finished task leaves in its folder: a rerun skips the tasks that have one.
DONE = "done.json"


def done_marker(folder: Path) -> Path:
    return folder / DONE


def load_state(path: Path) -> dict[str, Any] | None:
    """A training's resume state (``state.pt``), None when there is none; damaged, one error
    naming the file and the fix."""
    if not path.is_file():
        return None
    import torch  # heavy: only where a training resumes (the layout's other users need none)

    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # a truncated zip, a file of something else
        raise NasError(
            f"{path}: damaged resume state ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); remove it to restart that "
            "training from its first epoch"
        ) from None


def save_state(path: Path, state: dict[str, Any]) -> None:
    """A training's resume state, written atomically (a kill leaves the previous one)."""
    import torch  # heavy: only where a training checkpoints

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def run_key(dataset: str, seed: int) -> str:
    return f"{dataset}-seed{seed}"


@dataclass(frozen=True)
class RunLayout:
    """Every folder and file of one run, under its output folder ``root``."""

    root: Path

    def hparams(self, dataset: str, method: str) -> Path:
        """One sweep per dataset and method, shared by every seed: the seeds measure the spread
        of training with the chosen hyperparameters (as VPT's protocol does), not of the
        choice."""
        return self.root / "hparams" / dataset / method

    def supernet(self, dataset: str, seed: int) -> Path:
        return self.root / "supernet" / run_key(dataset, seed)

    def search(self, dataset: str, seed: int) -> Path:
        return self.root / "search" / run_key(dataset, seed)

    def verify(self, dataset: str, seed: int) -> Path:
        return self.root / "verify" / run_key(dataset, seed)

    def retrain(self, dataset: str, seed: int, label: str) -> Path:
        return self.root / "retrain" / run_key(dataset, seed) / label

    @property
    def ray(self) -> Path:
        """Ray Tune's storage_path: each stage's trials and their logs."""
        return self.root / "ray"

    @property
    def provenance(self) -> Path:
        return self.root / "provenance.json"

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"

    @property
    def identity(self) -> Path:
        """The folder's own id (``output_id``), which tags its MLflow runs."""
        return self.root / "output_id.json"


def run_layout(spec: ExperimentSpec) -> RunLayout:
    return RunLayout(spec.output)


def searched_top(spec: ExperimentSpec, dataset: str, seed: int) -> dict[str, Any]:
    """What the search chose for retraining (``top``: ranked candidates, each with its
    ``subnet`` and ``score`` on val): the verification's ranking with ``stages.verify``,
    else the search's own."""
    layout = run_layout(spec)
    where = layout.verify if spec.verify.enabled else layout.search
    return read_json(done_marker(where(dataset, seed)))


def _new_identity(path: Path, root: Path) -> dict[str, str]:
    """Write a fresh identity unless another process wrote one first (then read that)."""
    record = {"output_id": uuid.uuid4().hex, "path": str(root.resolve())}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    try:
        os.link(tmp, path)  # fails if the file exists: the first writer's id stands
    except FileExistsError:
        record = read_json(path)
    finally:
        tmp.unlink()
    return record


_IDS: dict[str, str] = {}


def output_id(root: Path) -> str:
    """The id of the output folder ``root``, made on first use: every MLflow run of this
    folder carries it (``nas.output_id``) and is found again only by it, so that another
    output of the same spec on the same tracking store never reopens this one's runs."""
    key = str(root.resolve())
    if key not in _IDS:
        path = RunLayout(root).identity
        record = read_json(path) if path.is_file() else _new_identity(path, root)
        if not isinstance(record, dict) or not isinstance(record.get("output_id"), str):
            raise NasError(f"{path}: damaged (expected an output_id); it names this folder's "
                           "MLflow runs: restore it, or remove it to start new runs")  # fmt: skip
        _IDS[key] = record["output_id"]
    return _IDS[key]


def recorded_path(root: Path) -> str | None:
    """Where the folder was when it last ran (its ``output_id.json``), if it has run."""
    path = RunLayout(root).identity
    record = read_json(path) if path.is_file() else None
    return record.get("path") if isinstance(record, dict) else None


def claim_output(root: Path) -> str | None:
    """Make or check the folder's id as ``nas run`` starts in it; what changed since its last
    run, as a line for the console (None when nothing did). A moved folder keeps its id (its
    runs are still its own); a copy, whose original still holds the id, gets a new one, so
    that its runs from now on are its own and the original's are never reopened."""
    layout = RunLayout(root)
    here = str(root.resolve())
    if not layout.identity.is_file():
        started_before = layout.provenance.is_file()
        output_id(root)
        if started_before:
            return (f"note: {root} was started by a version that did not tag its MLflow runs "
                    "with their output folder: its stages continue in new runs")  # fmt: skip
        return None
    record = read_json(layout.identity)
    old = record.get("path") if isinstance(record, dict) else None
    if not old or old == here:
        output_id(root)
        return None
    other = RunLayout(Path(old)).identity
    copied = other.is_file() and read_json(other).get("output_id") == record.get("output_id")
    if copied:
        record = {"output_id": uuid.uuid4().hex, "copied_from": old}
    record["path"] = here
    write_json(layout.identity, record)
    _IDS.pop(here, None)
    output_id(root)
    if copied:
        return (f"note: {root} is a copy of {old}: its MLflow runs from now on are its own "
                "(the original's are never reopened)")  # fmt: skip
    return f"note: {root} was moved from {old}; its MLflow runs are still its own"


#: The columns of MLflow 3.17's SQL store that hold absolute locations of a local store's
#: artifacts (and of the data a run saw): what moving a run folder leaves pointing at the old
#: place.
LOCATIONS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
    ("datasets", "dataset_source"),
)


def relocate_store(db: Path, old: str, new: str) -> int:
    """Point a local sqlite store's artifact locations from the folder ``old`` to ``new``
    (a run folder moved or copied from ``old`` to ``new``, its store and artifacts with it),
    so that it reads its own artifacts, never the old folder's. Returns how many were changed.
    """
    import sqlite3

    old, new = old.rstrip("/"), new.rstrip("/")
    prefixes = [(f"file://{old}/", f"file://{new}/"), (f"{old}/", f"{new}/")]
    changed = 0
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        tables = {r[0] for r in conn.execute("select name from sqlite_master where type='table'")}
        for table, column in LOCATIONS:
            if table not in tables:
                continue
            rows = conn.execute(f"select rowid, {column} from {table}").fetchall()
            for rowid, value in rows:
                if not isinstance(value, str):
                    continue
                moved = value
                for before, after in prefixes:
                    moved = moved.replace(before, after)
                if moved != value:
                    conn.execute(f"update {table} set {column} = ? where rowid = ?", (moved, rowid))
                    changed += 1
    return changed


def relocate_output(root: Path, own_store: bool) -> list[str]:
    """A run folder moved or copied since it last ran: its id kept (moved) or made new
    (copied), and, where its MLflow store is its own sqlite file (``own_store``), the store's
    artifact locations pointed into it. Returns what to say (nothing when it had not moved)."""
    previous = recorded_path(root)
    news = claim_output(root)
    if news is None:
        return []
    said = [news]
    db = root / "mlflow.db"
    if previous and own_store and db.is_file():
        n = relocate_store(db, previous, str(root.resolve()))
        said.append(f"note: {n} artifact location(s) in {db} now point into {root}")
    return said
