"""MLflow tracking for the pipeline: one experiment per spec, a parent run per dataset and
stage, a child run per candidate, artifacts for winners.

Runs are found again by their tags (``nas.spec_hash``, ``nas.stage``, ``nas.dataset``,
``nas.seed``), so an interrupted and resumed pipeline continues its runs instead of opening
new ones, and a candidate already logged is not logged twice. Candidates are logged from a
background thread in batches, so that tracking overlaps evaluation instead of adding to it.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# MLflow otherwise writes telemetry settings under ~/.config/mlflow; a user may still opt in.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag

from nas.errors import NasError

TAG = "nas."


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


class Tracker:
    """Get-or-create MLflow runs for one experiment.

    Args:
        uri: the tracking URI (``sqlite:////abs/mlflow.db``, ``http://127.0.0.1:5000``, ...).
        experiment: the experiment name.
        artifact_location: where a *new* experiment stores artifacts (an absolute path or
            URI); ignored when the experiment exists.
    """

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None) -> None:
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        try:
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = (
                found.experiment_id
                if found is not None
                else self.client.create_experiment(experiment, artifact_location=artifact_location)
            )
        except Exception as exc:
            raise NasError(f"cannot use the MLflow tracking store {uri!r}: {exc}") from None

    @staticmethod
    def client_for(uri: str) -> MlflowClient:
        return MlflowClient(tracking_uri=uri)

    def find_run(self, tags: Mapping[str, Any], parent: str | None = None) -> str | None:
        clauses = [f"tags.`{TAG}{k}` = {_quote(v)}" for k, v in tags.items()]
        if parent is not None:
            clauses.append(f"tags.`mlflow.parentRunId` = {_quote(parent)}")
        runs = self.client.search_runs(
            [self.experiment_id],
            " and ".join(clauses),
            max_results=2,
            order_by=["attributes.start_time ASC"],
        )
        return runs[0].info.run_id if runs else None

    def run(
        self,
        name: str,
        tags: Mapping[str, Any],
        parent: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> str:
        """The run with these tags (reopened if it exists), else a new one. A reopened run
        gets whichever of ``params`` it lacks (a stop between creating it and logging them)."""
        run_id = self.find_run(tags, parent)
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            if params:
                have = self.client.get_run(run_id).data.params
                missing = {k: v for k, v in params.items() if k not in have}
                if missing:
                    self.log_params(run_id, missing)
            return run_id
        all_tags = {f"{TAG}{k}": str(v) for k, v in tags.items()}
        if parent is not None:
            all_tags["mlflow.parentRunId"] = parent
        run_id = self.client.create_run(
            self.experiment_id, tags=all_tags, run_name=name
        ).info.run_id
        if params:
            self.log_params(run_id, params)
        return run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
        )

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def finish(self, run_id: str, ok: bool = True) -> None:
        status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
        self.client.set_terminated(run_id, status)

    def stop_running(self, tags: Mapping[str, Any]) -> int:
        """Mark the runs with these tags that are still RUNNING as KILLED (an interrupted
        pipeline); a rerun reopens them. Returns how many were marked."""
        clauses = [f"tags.`{TAG}{k}` = {_quote(v)}" for k, v in tags.items()]
        runs = self.client.search_runs(
            [self.experiment_id],
            " and ".join([*clauses, "attributes.status = 'RUNNING'"]),
            max_results=5000,
        )
        for run in runs:
            self.client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
        return len(runs)

    def children(self, parent: str, key_tag: str = "candidate") -> dict[str, tuple[str, str]]:
        """The parent's child runs by their ``nas.<key_tag>`` tag: (run id, status)."""
        found: dict[str, tuple[str, str]] = {}
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id],
                f"tags.`mlflow.parentRunId` = {_quote(parent)}",
                max_results=1000,
                page_token=token,
            )
            for r in page:
                key = r.data.tags.get(f"{TAG}{key_tag}")
                if key is not None:
                    found[key] = (r.info.run_id, r.info.status)
            token = page.token
            if not token:
                return found


class CandidateLogger:
    """Logs candidate child runs from a background thread, in the order given. A candidate
    whose run is already complete is skipped; one whose run a kill interrupted half-way
    (created, not yet finished) is completed in that same run."""

    def __init__(self, tracker: Tracker, parent: str, tags: Mapping[str, Any]) -> None:
        self.tracker, self.parent, self.tags = tracker, parent, dict(tags)
        children = tracker.children(parent)
        self.done = {k for k, (_, status) in children.items() if status == "FINISHED"}
        self.unfinished = {
            k: run_id for k, (run_id, status) in children.items() if k not in self.done
        }
        self.queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, daemon=True, name="mlflow-candidates")
        self.thread.start()

    def log(
        self,
        key: str,
        name: str,
        params: Mapping[str, Any],
        metrics: Mapping[str, float],
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        if key in self.done:
            return
        self.done.add(key)
        run_id = self.unfinished.pop(key, None)
        self.queue.put((key, run_id, name, dict(params), dict(metrics), dict(tags or {})))

    def _work(self) -> None:
        client = self.tracker.client
        while True:
            item = self.queue.get()
            if item is None:
                return
            key, run_id, name, params, metrics, tags = item
            try:
                if run_id is None:
                    all_tags = {f"{TAG}{k}": str(v) for k, v in {**self.tags, **tags}.items()}
                    all_tags[f"{TAG}candidate"] = key
                    all_tags["mlflow.parentRunId"] = self.parent
                    run = client.create_run(
                        self.tracker.experiment_id, tags=all_tags, run_name=name
                    )
                    run_id = run.info.run_id
                now = int(time.time() * 1000)
                client.log_batch(
                    run_id,
                    metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                    params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                    tags=[RunTag("mlflow.runName", name)],
                )
                client.set_terminated(run_id, "FINISHED")
            except BaseException as exc:
                self.error = exc

    def close(self) -> None:
        """Wait until everything queued is logged; raise what failed, if anything."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise NasError(f"MLflow logging failed: {self.error}")


def subnet_params_flat(subnet_data: Mapping[str, Any] | None) -> dict[str, Any]:
    """A subnet as flat MLflow params: ``vpt.depth``, ``vpt.dims``, ``pgn.prompts``, ..."""
    out: dict[str, Any] = {}
    for kind, value in (subnet_data or {}).items():
        for key, item in (value or {}).items():  # depth, dims; PGN: prompts, library, ...
            out[f"{kind}.{key}"] = ",".join(map(str, item)) if isinstance(item, list) else item
    return out
