"""Candidate child runs logged from separate Python processes (``CandidateLogger``): the
searching process pays for a pipe write per candidate, never for MLflow's own CPU time."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from nas.core.errors import NasError
from nas.core.paths import REPO_ROOT
from nas.tracking.runs import TAG, Tracker


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
        root = str(REPO_ROOT)  # the same code as this process
        code = (
            f"import sys; sys.path.insert(0, {root!r}); import nas.tracking.candidates as t; "
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
