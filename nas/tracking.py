"""MLflow tracking for the pipeline: one experiment per spec, a parent run per dataset and
stage, a child run per candidate, artifacts for winners.

Runs are found again by their tags (``nas.spec_hash``, ``nas.stage``, ``nas.dataset``,
``nas.seed``), so an interrupted and resumed pipeline continues its runs instead of opening
new ones, and a candidate already logged is not logged twice. Candidates are logged by
separate processes, so that tracking overlaps evaluation instead of adding to it: on a GPU, a
logging thread would take the interpreter lock from the thread that launches the kernels.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# MLflow otherwise writes telemetry settings under ~/.config/mlflow; a user may still opt in.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# With a tracking server MLflow prints "View run <url>" for every run it ends: hundreds of lines
# per search in the trials' logs. `nas report` and the MLflow UI say where runs are.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag

from nas.errors import NasError

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


class CandidateLogger:
    """Logs candidate child runs from separate Python processes, each fed one JSON line per
    candidate through a pipe: the searching process pays for a ``write`` only, never for
    MLflow's own CPU time (10-30 ms per candidate into sqlite: three transactions) or its
    interpreter lock. With ``processes`` > 1 the candidates are dealt out in turn, so that
    logging keeps up with a GPU that scores a candidate faster than one process logs it.

    A candidate whose run is already complete is skipped; one whose run a kill interrupted
    half-way (created, not yet finished) is completed in that same run. If the searching
    process dies, the loggers still log what they were sent, then end."""

    def __init__(
        self,
        tracker: Tracker,
        parent: str,
        tags: Mapping[str, Any],
        processes: int = 1,
        lock: Path | None = None,
    ) -> None:
        """``lock``: a file the logging processes hold a shared lock on for as long as any of
        them lives, after this process too (``wait_for_loggers`` waits for them)."""
        children = tracker.children(parent)
        self.done = {k for k, (_, status) in children.items() if status == "FINISHED"}
        self.unfinished = {
            k: run_id for k, (run_id, status) in children.items() if k not in self.done
        }
        root = str(Path(__file__).resolve().parents[1])  # the same code as this process
        code = (
            f"import sys; sys.path.insert(0, {root!r}); import nas.tracking as t; "
            "t._log_worker(int(sys.argv[1]))"
        )
        config = {
            "uri": tracker.uri,
            "experiment_id": tracker.experiment_id,
            "parent": parent,
            "tags": {k: str(v) for k, v in tags.items()},
            "run_tags": tracker.run_tags,
        }
        self.processes: list[subprocess.Popen] = []
        self.errors: list[int] = []  # per process, the read end of its error channel
        self.sent = 0
        self.lock: int | None = None
        if lock is not None:
            self.lock = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.lock, fcntl.LOCK_SH)  # shared with the children that inherit it
        for _ in range(max(1, processes)):
            # Errors come back through a pipe of their own: what MLflow prints on stdout
            # (e.g. "View run ..." after every run it ends on a tracking server) is chatter.
            read, write = os.pipe()
            process = subprocess.Popen(
                [sys.executable, "-c", code, str(write)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                text=True,
                bufsize=1,  # a line per candidate reaches MLflow as soon as it is scored
                pass_fds=(write,) if self.lock is None else (write, self.lock),
            )
            os.close(write)
            self.processes.append(process)
            self.errors.append(read)
            self._send(process, config)

    def _send(self, process: subprocess.Popen, item: Mapping[str, Any]) -> None:
        assert process.stdin is not None
        try:
            process.stdin.write(json.dumps(item) + "\n")
        except BrokenPipeError:
            self.close()  # raises what ended the logging process
            raise NasError("an MLflow logging process ended early") from None

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
        process = self.processes[self.sent % len(self.processes)]
        self.sent += 1
        self._send(
            process,
            {
                "key": key,
                "run_id": self.unfinished.pop(key, None),
                "name": name,
                "params": {k: str(v)[:6000] for k, v in params.items()},
                "metrics": {k: float(v) for k, v in metrics.items()},
                "tags": {k: str(v) for k, v in (tags or {}).items()},
            },
        )

    def close(self) -> None:
        """Wait until everything sent is logged; raise the first failure, if any."""
        errors = []
        for process, channel in zip(self.processes, self.errors, strict=True):
            if process.returncode is not None:
                continue  # closed before
            process.communicate()
            with os.fdopen(channel, encoding="utf-8", errors="replace") as pipe:
                error = pipe.read().strip()
            if process.returncode != 0 and not error:
                error = f"a logging process exited with code {process.returncode}"
            if error:
                errors.append(error)
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None
        if errors:
            raise NasError(f"MLflow logging failed: {errors[0]}")


def wait_for_loggers(locks: Iterable[Path], seconds: float) -> bool:
    """Wait up to ``seconds`` until no logging process holds any of ``locks`` (a stopped search
    leaves its loggers to log what they were sent). True when all have ended."""
    deadline = time.monotonic() + seconds
    for path in locks:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        return False
                    time.sleep(0.05)
        finally:
            os.close(fd)
    return True


def logging_processes(cpus: float) -> int:
    """How many candidate loggers a search trial holding ``cpus`` CPUs runs: one CPU stays
    with the search, the rest log (at most 4: sqlite takes one writer at a time)."""
    return max(1, min(4, int(cpus) - 1))


def _log_worker(error_fd: int) -> None:
    """The logging process: the first line on stdin says where to log, every further line is
    a candidate; at end of input, writes the first error (if any) to ``error_fd`` and exits."""
    config = json.loads(sys.stdin.readline())
    client = MlflowClient(tracking_uri=config["uri"])
    error = ""
    for line in sys.stdin:
        if error:
            continue  # drain the pipe so the searching process is never blocked
        c = json.loads(line)
        try:
            run_id = c["run_id"]
            if run_id is None:
                all_tags = {f"{TAG}{k}": v for k, v in {**config["tags"], **c["tags"]}.items()}
                all_tags.update(config.get("run_tags", {}))
                all_tags[f"{TAG}candidate"] = c["key"]
                all_tags["mlflow.parentRunId"] = config["parent"]
                run_id = client.create_run(
                    config["experiment_id"], tags=all_tags, run_name=c["name"]
                ).info.run_id
            now = int(time.time() * 1000)
            client.log_batch(
                run_id,
                metrics=[Metric(k, v, now, 0) for k, v in c["metrics"].items()],
                params=[Param(k, v) for k, v in c["params"].items()],
                tags=[RunTag("mlflow.runName", c["name"])],
            )
            client.set_terminated(run_id, "FINISHED")
        except Exception as exc:
            error = f"candidate {c['key']!r}: {type(exc).__name__}: {exc}".replace("\n", " ")
    with os.fdopen(error_fd, "w", encoding="utf-8") as channel:
        channel.write(error)
    sys.exit(1 if error else 0)


def subnet_params_flat(subnet_data: Mapping[str, Any] | None) -> dict[str, Any]:
    """A subnet as flat MLflow params: ``vpt.depth``, ``vpt.dims``, ``pgn.prompts``, ..."""
    out: dict[str, Any] = {}
    for kind, value in (subnet_data or {}).items():
        for key, item in (value or {}).items():  # depth, dims; PGN: prompts, library, ...
            out[f"{kind}.{key}"] = ",".join(map(str, item)) if isinstance(item, list) else item
    return out


#: The columns of the winners' view in the MLflow UI (canonical keys, as its runs table names
#: them), in order.
WINNER_COLUMNS = (
    "metrics.`test_acc`",
    "metrics.`val_acc`",
    "metrics.`params`",
    "metrics.`added_flops`",
    "params.`subnet`",
    "params.`role`",
    "tags.`nas.dataset`",
    "tags.`nas.seed`",
)


def winners_view(client: MlflowClient, experiment_id: str, output_id: str) -> str:
    """An MLflow UI view of one output folder's retrained models, saved on the experiment as
    the UI saves a shared view (tag ``mlflow.sharedViewState.<key>``): its retrain runs only
    (no candidate or stage run in the way), the searched winners first (then the baselines),
    test_acc, val_acc, params and added FLOPs as columns. Returns the key; the page is
    ``#/experiments/<id>/runs?viewStateShareKey=<key>``. (The UI shares no pinned runs.)"""
    where = f"tags.`nas.stage` = 'retrain' and tags.`nas.output_id` = '{output_id}'"
    key = f"nas-winners-{output_id[:12]}"
    # "searched" sorts before "searched (not reported)", then the baselines
    return _save_view(client, experiment_id, key, where, "params.`role`")


def stages_view(client: MlflowClient, experiment_id: str, output_id: str) -> str:
    """A saved view of one output folder's runs without its candidates, newest first: every
    stage run (hparams, supernet, search, verify, retrain) on the first page. The default
    runs page pages child runs with the rest (100 to a page, newest first), so a search's
    candidates push the supernet runs behind "Load more"."""
    where = f"tags.`nas.output_id` = '{output_id}' and tags.`nas.candidate` IS NULL"
    return _save_view(client, experiment_id, f"nas-stages-{output_id[:12]}", where,
                      "attributes.start_time")  # fmt: skip


def _save_view(client: MlflowClient, experiment_id: str, key: str, where: str, order: str) -> str:
    state = {
        "searchFilter": where,
        "orderByKey": order,
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        "selectedColumns": list(WINNER_COLUMNS),
        "runsExpanded": {},
        "viewMaximized": False,
        "runListHidden": False,
    }
    client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{key}", json.dumps(state))
    return key


def ui_link(uri: str, experiment_id: str, key: str) -> str:
    """Where the MLflow UI shows the view ``key``: on the tracking server itself, or, for a
    local store, once ``mlflow ui`` serves it."""
    page = f"#/experiments/{experiment_id}/runs?viewStateShareKey={key}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return (
        f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then "
        f"http://127.0.0.1:5000/{page}"
    )
