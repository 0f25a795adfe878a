"""MLflow tracking for the pipeline: one experiment per spec, a parent run per dataset and
stage, a child run per candidate, artifacts for winners.

Runs are found again by their tags (``nas.spec_hash``, ``nas.stage``, ``nas.dataset``,
``nas.seed``), so an interrupted and resumed pipeline continues its runs instead of opening
new ones, and a candidate already logged is not logged twice. Candidates are logged by
separate processes, so that tracking overlaps evaluation instead of adding to it: on a GPU, a
logging thread would take the interpreter lock from the thread that launches the kernels.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# MLflow otherwise writes telemetry settings under ~/.config/mlflow; a user may still opt in.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# With a tracking server MLflow prints "View run <url>" for every run it ends: hundreds of lines
# per search in the trials' logs. `nas report` and the MLflow UI say where runs are.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus

from nas.core.errors import NasError

TAG = "nas."


#: MLflow tracking URI schemes: a server (and its artifact proxy), or a store the client opens
#: itself (a path without a scheme is a local file store).
REMOTE_SCHEMES = ("http", "https", "databricks")
LOCAL_SCHEMES = ("sqlite", "file", "postgresql", "mysql", "mssql")


def uri_problem(uri: str) -> str | None:
    """What is wrong with a tracking URI's form (None when MLflow can open it)."""
    match = re.match(r"^([A-Za-z][\w+.-]*)://", uri)
    scheme = match.group(1).lower() if match else ""
    base = scheme.split("+", 1)[0]  # e.g. postgresql+psycopg2
    if scheme and base not in REMOTE_SCHEMES + LOCAL_SCHEMES:
        known = ", ".join(f"{s}://" for s in REMOTE_SCHEMES + LOCAL_SCHEMES)
        return f"unsupported scheme {scheme!r} in {uri!r} (expected {known})"
    if base in ("http", "https") and not re.match(r"^https?://[^/:\s]+", uri):
        return f"{uri!r} names no host (expected http://HOST:PORT)"
    return None


def probe_server(uri: str, timeout: float = 10.0) -> str | None:
    """Why a tracking server at an http(s) URI does not answer (None when it does, or when the
    URI is not a server): MLflow's client would retry for minutes instead."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # something answers (behind a proxy or authentication /health may differ)
    except (urllib.error.URLError, OSError) as exc:
        return f"no MLflow server answers there ({getattr(exc, 'reason', exc)})"


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


class Tracker:
    """Get-or-create MLflow runs for one experiment.

    Args:
        uri: the tracking URI (``sqlite:////abs/mlflow.db``, ``http://127.0.0.1:5000``, ...).
        experiment: the experiment name.
        artifact_location: where a *new* experiment stores artifacts (an absolute path or
            URI); ignored when the experiment exists.
        run_tags: tags set on every run this tracker creates (not used to find runs).
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        artifact_location: str | None = None,
        run_tags: Mapping[str, str] | None = None,
    ) -> None:
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        self.run_tags = dict(run_tags or {})
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
        description: str | None = None,
    ) -> str:
        """The run with these tags (reopened if it exists), else a new one. A reopened run
        gets whichever of ``params`` it lacks (a stop between creating it and logging them).
        ``description``: the one line the UI shows as the run's description."""
        run_id = self._run(name, tags, parent, params)
        if description:
            self.client.set_tag(run_id, "mlflow.note.content", description)
        return run_id

    def _run(
        self,
        name: str,
        tags: Mapping[str, Any],
        parent: str | None,
        params: Mapping[str, Any] | None,
    ) -> str:
        run_id = self.find_run(tags, parent)
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            if params:
                have = self.client.get_run(run_id).data.params
                missing = {k: v for k, v in params.items() if k not in have}
                if missing:
                    self.log_params(run_id, missing)
            return run_id
        all_tags = {**self.run_tags, **{f"{TAG}{k}": str(v) for k, v in tags.items()}}
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
