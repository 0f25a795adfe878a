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

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nas.errors import NasError
from nas.jsonio import read_json
from nas.spec import ExperimentSpec


def load_state(path: Path) -> dict[str, Any] | None:
    """A training's resume state (``state.pt``), None when there is none; damaged, one error
    naming the file and the fix."""
    if not path.is_file():
        return None
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


def run_layout(spec: ExperimentSpec) -> RunLayout:
    return RunLayout(spec.output)


def searched_top(spec: ExperimentSpec, dataset: str, seed: int) -> dict[str, Any]:
    """What the search chose for retraining (``top``: ranked candidates, each with its
    ``subnet`` and ``score`` on val): the verification's ranking with ``stages.verify``,
    else the search's own."""
    layout = run_layout(spec)
    where = layout.verify if spec.verify.enabled else layout.search
    return read_json(where(dataset, seed) / "done.json")
