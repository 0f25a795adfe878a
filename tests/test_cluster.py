"""Clusters: a two-node Ray cluster on this machine (both nodes on 127.0.0.1) with a local
MLflow tracking server, and `ray job submit` to a `ray start --head` cluster. Everything the
tests start listens on 127.0.0.1 and is stopped by PID."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient

from nas.pipeline.layout import run_key
from nas.space.subnet import Subnet
from tests.conftest import ENV, REPO, free_port

SPEC = REPO / "tests" / "specs" / "small.yaml"


def kill_matching(text: str) -> None:
    """SIGKILL every process whose command line contains ``text``, and their descendants
    (Ray's agents rename themselves, so they are found through their parents)."""
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True
    ).stdout
    rows = [[*line.split(None, 2), ""] for line in out.splitlines()]
    children: dict[int, list[int]] = {}
    for pid, ppid, *_ in rows:
        children.setdefault(int(ppid), []).append(int(pid))
    todo = [int(pid) for pid, _, args, *_ in rows if text in args and int(pid) != os.getpid()]
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo += children.get(pid, [])
    for pid in seen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def ray_cli(*args: str, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    ray_bin = str(Path(sys.executable).parent / "ray")
    return subprocess.run(
        [ray_bin, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def nas_run(spec: Path, output: Path, env: dict, extra: dict | None = None, cwd: Path = REPO):
    text = spec.read_text()
    if extra:
        import yaml

        data = yaml.safe_load(text)
        data.update(extra)
        spec = output.parent / f"{output.name}.yaml"
        spec.write_text(yaml.safe_dump(data))
    return subprocess.run(
        [sys.executable, "-m", "nas", "run", str(spec), "--output", str(output)],
        cwd=cwd,
        env={**os.environ, **ENV, **env},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def small_data(root: Path) -> dict:
    """The spec's datasets read from ``root`` (the conftest's shortened lists) instead of
    prepared in full inside the run's output."""
    return {
        "datasets": [
            {"name": name, "format": "mini-vtab", "root": str(root)}
            for name in ("digits", "dsprites_loc")
        ]
    }


def agent_ports() -> list[str]:
    """``ray start`` flags giving a node's agents free ports (Ray's defaults are fixed, so two
    Rays on one machine would share them)."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


def test_two_node_cluster(tmp_path, mlflow_server, small_mini_vtab):
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    env = {**os.environ, **ENV}
    port = free_port()
    head = ray_cli(
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--num-cpus=1",
        "--include-dashboard=false",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
        *agent_ports(),
        env=env,
    )
    try:
        assert head.returncode == 0, head.stderr[-2000:]
        second = ray_cli(
            "start",
            f"--address=127.0.0.1:{port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            *agent_ports(),
            env=env,
        )
        assert second.returncode == 0, second.stderr[-2000:]
        env = {"RAY_ADDRESS": f"127.0.0.1:{port}"}
        # A node-local sqlite store on a two-node cluster is refused, with the fix.
        refused = nas_run(SPEC, tmp_path / "refused", env, extra=small_data(small_mini_vtab))
        assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
        assert "the cluster has 2 nodes but mlflow.tracking_uri is 'sqlite:" in refused.stderr
        assert "mlflow.tracking_uri: http://<head ip>:5000" in refused.stderr
        # With a tracking server every node reaches, it runs, on both nodes.
        out = tmp_path / "shared" / "run"
        out.parent.mkdir()
        tracking = {"mlflow": {"tracking_uri": mlflow_server, "experiment": "two"}}
        done = nas_run(SPEC, out, env, extra={**tracking, **small_data(small_mini_vtab)})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    finally:
        kill_matching(temp)
        shutil.rmtree(temp, ignore_errors=True)
    nodes = {json.loads(p.read_text())["node"] for p in (out / "supernet").glob("*/done.json")}
    assert len(nodes) == 2, "the two supernet trials should run on different nodes"
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("two")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 * 12
    assert json.loads((out / "results.json").read_text())["per_dataset"].keys() == {
        "digits",
        "dsprites_loc",
    }


def test_ray_job_submit_stop_and_resubmit(tmp_path, mlflow_server):
    """`ray job submit` of a spec to a `ray start --head` cluster, tracked by a real `mlflow
    server`; `ray job stop` mid-supernet (SIGTERM) stops it cleanly, and submitting the same
    command again finishes the run with exactly the MLflow runs of an uninterrupted one: no
    trial failed or was retried, every run FINISHED, none duplicated, and the candidates in
    MLflow are exactly those the searches scored (their logs on disk)."""
    import yaml

    spec = yaml.safe_load(SPEC.read_text())
    spec["mlflow"] = {"tracking_uri": mlflow_server, "experiment": "small"}
    spec_path = tmp_path / "small-served.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    port, dash = free_port(), free_port()
    env = {**os.environ, **ENV}
    start = ray_cli(
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
        # Its job agent's own ports: at Ray's defaults (52365, ...) any other Ray on this
        # machine, such as a test's private one on the other xdist worker, holds them, and
        # the agent never serves ("No available agent to submit job").
        *agent_ports(),
        env=env,
    )
    out = tmp_path / "job-output"  # absolute: the job runs in a copy of the working dir
    address = f"--address=http://127.0.0.1:{dash}"
    command = ["--", sys.executable, "-m", "nas", "run", str(spec_path)]

    def submit(*flags: str, output: str = str(out)) -> subprocess.CompletedProcess:
        deadline = time.time() + 300  # a loaded 2-core machine: the agent took over 120 s
        while True:  # the job agent comes up a little after `ray start` returns
            job = ray_cli(
                "job",
                "submit",
                address,
                f"--working-dir={REPO}",
                *flags,
                *command,
                "--output",
                output,
                env=env,
                timeout=900,
            )
            if "No available agent" not in job.stderr or time.time() > deadline:
                return job
            time.sleep(3)

    try:
        assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
        first = submit("--no-wait", "--submission-id=first")
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
        deadline = time.time() + 300
        while not list((out / "supernet").glob("*/state.pt")):  # mid-supernet
            assert time.time() < deadline, ray_cli("job", "logs", address, "first", env=env).stdout
            time.sleep(0.5)
        stop = ray_cli("job", "stop", address, "first", env=env)
        assert stop.returncode == 0, stop.stdout[-2000:] + stop.stderr[-2000:]
        logs = ray_cli("job", "logs", address, "first", env=env).stdout
        assert "nas: stopped; run the same command again to continue" in logs, logs[-3000:]
        assert not (out / "results.json").exists()
        # the stopped stage is said and recorded as stopped, not as a finished stage
        assert re.search(r"== supernet\+search: [\d.]+ s \(stopped\)", logs), logs[-3000:]
        stopped_at = json.loads((out / "timings.json").read_text())[-1]["stages"]
        assert stopped_at["supernet+search"]["ended"] == "stopped", stopped_at
        client = MlflowClient(mlflow_server)
        stopped = client.search_runs([client.get_experiment_by_name("small").experiment_id])
        assert stopped and {r.info.status for r in stopped} == {"KILLED"}

        job = submit()
        assert job.returncode == 0 and "succeeded" in job.stdout, (
            job.stdout[-4000:] + job.stderr[-2000:]
        )
        assert "retrying:" not in job.stdout and "failed" not in job.stdout, job.stdout[-4000:]
        # A relative output would land in Ray's copy of the working directory: refused.
        relative = submit("--submission-id=relative", output="runs/relative")
        assert relative.returncode != 0
        assert "output" in relative.stdout and "`ray job submit` made for this job" in (
            relative.stdout
        ), relative.stdout[-3000:]
        assert "Traceback" not in relative.stdout
        # `ray job logs` is not a terminal: a timestamped line per progress and per trial's
        # end, and none of Ray Tune's tables, Ray's worker prefixes or MLflow's run links.
        stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
        assert re.search(
            stamp + r"\[retrain digits seed 0 \w+\] epoch \d+/\d+: loss", job.stdout, re.M
        )
        assert re.search(stamp + r"\[search \w+ seed 0\] done after \d+ s; ", job.stdout, re.M)
        for noise in (
            "(_trainable pid=",
            "Configuration for experiment",
            "tensorboard",
            "View run",
        ):
            assert noise.lower() not in job.stdout.lower(), (noise, job.stdout[-4000:])
    finally:
        kill_matching(temp)
        shutil.rmtree(temp, ignore_errors=True)
    results = json.loads((out / "results.json").read_text())
    assert set(results["per_dataset"]) == {"digits", "dsprites_loc"}
    # The job ran the uploaded copy of the code, not this checkout.
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["spec"]["name"] == "small"
    # Continued, not duplicated: per task one supernet, one search with 12 candidates, one
    # retrain run, all finished.
    runs = client.search_runs([client.get_experiment_by_name("small").experiment_id])
    stages = [r.data.tags["nas.stage"] for r in runs]
    assert len(runs) == 2 * (1 + 1 + 12 + 1) and stages.count("supernet") == 2
    assert {r.info.status for r in runs} == {"FINISHED"}
    scored = {
        (log.parent.name, Subnet.from_data(json.loads(line)["subnet"]).key())
        for log in (out / "search").glob("*/candidates.jsonl")
        for line in log.read_text().splitlines()
    }
    logged = {
        (run_key(t["nas.dataset"], int(t["nas.seed"])), t["nas.candidate"])
        for t in (r.data.tags for r in runs)
        if "nas.candidate" in t
    }
    assert scored == logged and len(logged) == 2 * 12
