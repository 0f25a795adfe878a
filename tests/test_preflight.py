"""What `nas run` checks before anything starts: an unreachable tracking server or Ray
cluster, an output that cannot be a folder, more CPUs per trial than any node has. Each is one
line naming the key and what was expected, exit status 2, no traceback, and no output folder
left behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nas.cli import main
from tests.conftest import ENV

BASE = {
    "name": "pre",
    "datasets": [{"name": "digits", "format": "mini-vtab"}],
    "backbone": "vit_fmnist",
    "space": "tiny_cpu",
}


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp_path: Path, capsys, **change) -> str:
    spec = {**BASE, "output": str(tmp_path / "out"), **change}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_a_tracking_server_that_does_not_answer(tmp_path, capsys):
    port = closed_port()
    err = run(tmp_path, capsys, mlflow={"tracking_uri": f"http://127.0.0.1:{port}"})
    assert f"mlflow.tracking_uri http://127.0.0.1:{port}: no MLflow server answers there" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("127.0.0.1:{port}", "ray.address '127.0.0.1:{port}': no Ray cluster answers there"),
        ("headnode", "ray.address 'headnode': expected HOST:PORT of a running cluster's head"),
    ],
)
def test_a_ray_address_that_does_not_answer(tmp_path, capsys, address, message):
    port = closed_port()
    err = run(tmp_path, capsys, ray={"address": address.format(port=port)})
    assert message.format(port=port) in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (None, "output: expected a folder path, got nothing (null)"),
        ("{tmp}/a-file", "output {tmp}/a-file is a file, not a folder"),
        ("{tmp}/a-file/below", "{tmp}/a-file is a file, so no folder can be made below it"),
    ],
)
def test_an_output_that_cannot_be_a_folder(tmp_path, capsys, output, message):
    (tmp_path / "a-file").write_text("not a folder")
    value = None if output is None else output.format(tmp=tmp_path)
    err = run(tmp_path, capsys, output=value)
    assert message.format(tmp=tmp_path) in err
    assert not (Path.cwd() / "None").exists()


def test_more_cpus_per_trial_than_this_machine_has(tmp_path):
    """A private Ray never gains a node: trials asking for more CPUs would wait forever."""
    path = tmp_path / "spec.yaml"
    path.write_text(
        yaml.safe_dump({**BASE, "output": str(tmp_path / "out"), "resources": {"cpus": 4096}})
    )
    proc = subprocess.run(
        [sys.executable, "-m", "nas", "run", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **ENV},
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "resources.cpus is 4096 per trial but no node of the Ray cluster has that many" in (
        proc.stderr
    )
    assert "set resources.cpus to at most" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing started, nothing written
