"""What `nas run` checks before anything starts: an unreachable tracking server or Ray
cluster, an output that cannot be a folder, more CPUs per trial than any node has. Each is one
line naming the key and what was expected, exit status 2, no traceback, and no output folder
left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nas.cli.main import main
from nas.core.errors import NasError
from tests.conftest import ENV, free_port

BASE = {
    "name": "pre",
    "datasets": [{"name": "digits", "format": "mini-vtab"}],
    "backbone": "vit_fmnist",
    "space": "tiny_cpu",
}


def run(tmp_path: Path, capsys, **change) -> str:
    spec = {**BASE, "output": str(tmp_path / "out"), **change}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_a_tracking_server_that_does_not_answer(tmp_path, capsys):
    port = free_port()  # bound, then released: nothing listens
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
    port = free_port()  # bound, then released: nothing listens
    err = run(tmp_path, capsys, ray={"address": address.format(port=port)})
    assert message.format(port=port) in err
    assert not (tmp_path / "out").exists()


def test_ray_auto_with_a_stale_address_file_is_one_line_in_seconds(tmp_path, capsys, monkeypatch):
    """A head killed without `ray stop` leaves its address in Ray's temp folder: Ray's own
    `auto` would try it for minutes; here it is one line naming the address and the file."""
    import time

    port = free_port()  # bound, then released: nothing listens
    (tmp_path / "raytmp" / "ray").mkdir(parents=True)
    listed = tmp_path / "raytmp" / "ray" / "ray_current_cluster"
    listed.write_text(f"127.0.0.1:{port}\n")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "raytmp"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    started = time.monotonic()
    err = run(tmp_path, capsys, ray={"address": "auto"})
    assert time.monotonic() - started < 30
    assert f"ray.address 'auto' (127.0.0.1:{port}): no Ray cluster answers there" in err
    assert f"{listed} still names it" in err and "--address" not in err
    assert not (tmp_path / "out").exists()

    listed.unlink()  # no cluster was ever started here
    err = run(tmp_path, capsys, ray={"address": "auto"})
    assert (
        f"ray.address 'auto': no cluster was started with `ray start` on this machine (no {listed})"
        in err
    )


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"output": "runs/x"}, "output"),
        ({"mlflow": {"tracking_uri": "sqlite:///mlflow.db"}}, "mlflow.tracking_uri"),
        ({"mlflow": {"artifact_location": "art"}}, "mlflow.artifact_location"),
    ],
)
def test_a_relative_path_in_a_ray_jobs_working_dir_copy_is_refused(
    tmp_path, capsys, monkeypatch, change, key
):
    """`ray job submit` runs the job in a copy of the working directory under Ray's temp
    folder (the cluster test submits one for real): a relative path would write there."""
    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_ab12"
    (copy / "sub").mkdir(parents=True)
    monkeypatch.chdir(copy / "sub")
    err = run(tmp_path, capsys, **change)
    assert f"{key} " in err and f"{copy}/sub/" in err
    assert "`ray job submit` made for this job" in err
    assert "give an absolute path" in err
    assert list(copy.rglob("*")) == [copy / "sub"]


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


@pytest.fixture
def vtab_copy(tmp_path, mini_vtab_data):
    """The digits task as a VTAB-1k folder of its own, to break (under a name whose class
    count is not known, so that it is taken from the labels)."""
    folder = tmp_path / "vtab" / "my-digits"
    shutil.copytree(Path(mini_vtab_data) / "digits", folder)
    return folder


def vtab_spec(folder: Path, **change) -> dict:
    dataset = {"name": folder.name, "format": "vtab", "root": str(folder.parent)}
    return {"datasets": [dataset], **change}


def test_lists_repeating_every_line_fail_before_ray(tmp_path, capsys, vtab_copy):
    """NOAH's released 1-shot lists repeat every line: said before any trial, naming the line."""
    listing = vtab_copy / "train800.txt"
    lines = listing.read_text().splitlines()
    listing.write_text("\n".join(line for line in lines for _ in range(2)) + "\n")
    err = run(tmp_path, capsys, **vtab_spec(vtab_copy))
    assert f"{listing}:2:" in err and "duplicates: drop" in err, err
    assert not (tmp_path / "out").exists()


def test_a_corrupt_image_fails_before_ray(tmp_path, capsys, vtab_copy):
    first = (vtab_copy / "test.txt").read_text().split()[0]
    (vtab_copy / first).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    err = run(tmp_path, capsys, **vtab_spec(vtab_copy))
    assert f"{vtab_copy / 'test.txt'}:1: cannot decode image" in err, err


def test_a_mistyped_label_and_a_wrong_union_fail_before_ray(tmp_path, capsys, vtab_copy):
    """Without classnames.txt the class count comes from the labels: a typo may not add 62."""
    (vtab_copy / "classnames.txt").unlink()
    listing, both = vtab_copy / "val200.txt", vtab_copy / "train800val200.txt"
    lines = listing.read_text().splitlines()
    path, label = lines[3].rsplit(" ", 1)
    for f in (listing, both):  # the same typo in both lists
        f.write_text(f.read_text().replace(f"{path} {label}\n", f"{path} 71\n"))
    err = run(tmp_path, capsys, **vtab_spec(vtab_copy))
    assert "labels 10-70 are never used, yet labels go up to 71" in err, err
    assert f"{listing}:4" in err
    listing.write_text("\n".join(lines[:-1]) + "\n")  # one image fewer than train800val200
    err = run(tmp_path, capsys, **vtab_spec(vtab_copy))
    assert "train800val200.txt: is not train800.txt and val200.txt together" in err, err


def test_backbone_weights_that_do_not_load_fail_before_ray(tmp_path, capsys):
    from nas.families.vit.spec import BACKBONES_DIR

    shipped = yaml.safe_load((BACKBONES_DIR / "vit_fmnist" / "backbone.yaml").read_text())
    weights = tmp_path / "w.safetensors"
    good = (BACKBONES_DIR / "vit_fmnist" / shipped["weights"]).read_bytes()
    weights.write_bytes(good[:5000])  # truncated
    backbone = {**shipped, "weights": str(weights)}
    err = run(tmp_path, capsys, backbone=backbone)
    assert f"{weights}: not a readable safetensors file" in err, err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def resumable(tmp_path):
    """An output folder as a stopped run leaves it (provenance of this very spec)."""
    from nas.pipeline import preflight, provenance
    from nas.spec.experiment import load_spec

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**BASE, "output": str(tmp_path / "out")}))
    spec = preflight.check_output(load_spec(path), new=False)
    provenance.record_output(spec)
    return spec.output


@pytest.mark.parametrize(
    ("damaged", "content", "message"),
    [
        ("supernet/digits-seed0/done.json", b'{"val', "damaged (Unterminated string"),
        ("provenance.json", b"", "damaged (Expecting value"),
        ("supernet/digits-seed0/state.pt", b"PK\x03\x04 cut", "damaged resume state"),
        ("retrain/digits-seed0/rank1/state.pt", b"", "damaged resume state"),
        ("mlflow.db", b"SQLite format 3\x00" + b"\x00" * 90, "the run's MLflow store is damaged"),
    ],
)
def test_damaged_resume_state_is_named_before_ray(
    tmp_path, capsys, resumable, damaged, content, message
):
    target = resumable / damaged
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(content)
    assert main(["run", str(tmp_path / "spec.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"{target}: " in err and message in err and "Traceback" not in err, err
    assert not (resumable / "ray").exists()  # Ray never started


def test_a_candidates_log_cut_mid_line_is_repaired_before_appending(tmp_path):
    from nas.pipeline.subnet_search import read_candidates_log

    good = [
        json.dumps({"subnet": {"lora": {"depth": 2, "dims": d}}, "score": 0.5, "cost": 1.0})
        for d in (2, 4)
    ]
    log = tmp_path / "candidates.jsonl"
    log.write_text("\n".join(good) + '\n{"subnet": {"lo')  # a kill mid-write
    assert len(read_candidates_log(log)) == 2
    assert log.read_text() == "\n".join(good) + "\n"  # what is appended starts a line
    with open(log, "a") as f:
        f.write(good[0] + "\n")
    assert len(read_candidates_log(log)) == 3
    log.write_text(good[0] + "\n{broken\n" + good[1] + "\n")  # damage before the end
    with pytest.raises(NasError, match=r"candidates\.jsonl:2: damaged candidate line"):
        read_candidates_log(log)


def test_a_store_whose_writer_was_killed_mid_transaction_is_not_damaged(tmp_path):
    """A kill -9 while MLflow writes leaves a hot journal beside mlflow.db: SQLite rolls it
    back on the next open. The pre-flight check must not call that store damaged (it did, with
    a read-only open: "attempt to write a readonly database")."""
    import sqlite3
    import textwrap

    from nas.pipeline.preflight import check_resume_state
    from nas.spec.experiment import load_spec

    out = tmp_path / "out"
    out.mkdir()
    store = out / "mlflow.db"
    with sqlite3.connect(store) as db:
        db.execute("CREATE TABLE experiments (id INTEGER)")
        db.execute("INSERT INTO experiments VALUES (1)")
    writer = textwrap.dedent(
        f"""
        import os, sqlite3
        db = sqlite3.connect({str(store)!r}, isolation_level=None)
        db.execute("PRAGMA cache_size=1")  # spill pages to the file: the journal is hot
        db.execute("BEGIN")
        db.executemany("INSERT INTO experiments VALUES (?)", [(i,) for i in range(20000)])
        os._exit(9)  # killed mid-transaction
        """
    )
    subprocess.run([sys.executable, "-c", writer], check=False)
    assert (out / "mlflow.db-journal").is_file()
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**BASE, "output": str(out)}))
    check_resume_state(load_spec(path))  # no error
    with sqlite3.connect(store) as db:
        assert db.execute("SELECT count(*) FROM experiments").fetchone() == (1,)  # rolled back
