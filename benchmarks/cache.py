"""The benchmarks' caches: JSON files under ``benchmarks/results/`` (``--results`` moves
them), one per (kind, task), that several processes may fill at once. Every write merges with
what is on disk under a lock and replaces the file atomically, so that a stopped run continues
where it stopped and the committed caches let anyone recompute a table without retraining.

- ``cached_run``: whole experiment runs by key (``{"task", "runs": {key: run}}``);
- ``TrainedAlone``: test accuracies of subnets trained alone (the ground truth and every
  retrained control), by (subnet, recipe, seed) (``{"task", "recipes", "entries"}``).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nas.space.subnet import Subnet

#: The committed results (``--results`` points a run elsewhere, e.g. a smoke run).
RESULTS = Path(__file__).resolve().parent / "results"


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def locked_merge(
    path: Path, merge: Callable[[dict[str, Any]], dict[str, Any]], *, sort_keys: bool = False
) -> None:
    """Write ``merge(what is on disk now)`` to ``path``, under a lock beside it, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc = merge(read(path))
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=sort_keys))
        os.replace(tmp, path)


def cached_run(
    folder: Path, kind: str, task: str, key: str, compute: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """``compute()``'s result, cached in ``folder/<kind>/<task>.json`` under ``key``."""
    path = folder / kind / f"{task}.json"
    found = read(path).get("runs", {})
    if key in found:
        return found[key]
    run = compute()

    def merge(doc: dict[str, Any]) -> dict[str, Any]:
        doc = doc or {"task": task, "runs": {}}
        doc["runs"][key] = run
        return doc

    locked_merge(path, merge)
    return run


class TrainedAlone:
    """Test accuracies of subnets trained alone on one task (``folder/<task>.json``), with the
    recipes they were trained by (``recipes``: key -> settings)."""

    def __init__(self, task: str, folder: Path) -> None:
        self.path = folder / f"{task}.json"
        self.task = task
        self.entries: dict[str, dict[str, Any]] = {}
        self.recipes: dict[str, dict[str, Any]] = {}
        self.refresh()

    def refresh(self) -> None:
        """Take in what other processes wrote since (they fill the same file)."""
        data = read(self.path)
        self.entries = {**data.get("entries", {}), **self.entries}
        self.recipes = {**data.get("recipes", {}), **self.recipes}

    @staticmethod
    def key(subnet: Subnet, recipe: str, seed: int) -> str:
        return f"{subnet}|{recipe}|{seed}"

    def get(self, subnet: Subnet, recipe: str, seed: int) -> float | None:
        entry = self.entries.get(self.key(subnet, recipe, seed))
        return None if entry is None else float(entry["test_acc"])

    def put(
        self,
        subnet: Subnet,
        recipe: str,
        settings: dict[str, Any],
        seed: int,
        acc: float,
        seconds: float,
    ) -> None:
        """Record ``subnet``'s accuracy under ``recipe`` (whose ``settings`` are recorded once)."""
        self.recipes[recipe] = settings
        self.entries[self.key(subnet, recipe, seed)] = {
            "subnet": subnet.to_data(),
            "seed": seed,
            "recipe": recipe,
            "test_acc": acc,
            "seconds": round(seconds, 1),
        }

        def merge(there: dict[str, Any]) -> dict[str, Any]:
            self.entries = {**there.get("entries", {}), **self.entries}
            self.recipes = {**there.get("recipes", {}), **self.recipes}
            return {"task": self.task, "recipes": self.recipes, "entries": self.entries}

        locked_merge(self.path, merge, sort_keys=True)
