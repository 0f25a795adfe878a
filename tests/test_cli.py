"""The ``nas space`` command: summaries, validation, and errors without tracebacks."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

from nas.cli.main import main
from tests.conftest import REPO, free_port, small_space_yaml


def test_space_show_default(capsys):
    assert main(["space", "show"]) == 0
    out = capsys.readouterr().out
    assert "noah-vtab" in out
    assert "subnets       168,086,938,404,672,000" in out
    assert "smallest      vpt=1x3 lora=1x3 adapter=1x3  (18,435 params" in out
    assert "params <= 640,000: 168,086,938,404,671,323 subnets fit" in out


def test_space_show_json(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(small_space_yaml(extra="budget: {params: {max: 3000}}"))
    assert main(["space", "show", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    # vpt: dims {0,2,3} include 0, so every depth is a prefix of depth 4: 3^4 subnets;
    # lora: dims {1,4}, depths {2,4}: 2^2 + 2^4; adapter: dims {0,3,8}, max depth 3: 3^3.
    assert summary["subnets"] == 3**4 * (2**2 + 2**4) * 3**3
    assert summary["budget"]["exact"] and 0 < summary["budget"]["fitting"] < summary["subnets"]
    assert summary["smallest"]["subnet"] == "lora=1x2"


def test_space_validate_every_shipped_file(capsys):
    files = sorted(str(p) for p in (REPO / "search_spaces").glob("*.yaml"))
    assert main(["space", "validate", *files]) == 0
    assert capsys.readouterr().out.count(": ok (") == len(files)


def test_bad_file_exits_2_with_one_line_and_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(small_space_yaml().replace("dims: [1, 4]", "dims: [1, -4]"))
    result = subprocess.run(
        [sys.executable, "-m", "nas", "space", "validate", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"nas: error: {path}:")
    assert "modules.lora.dims[1]: -4 is negative" in lines[0]


def test_subnet_show(tmp_path, capsys):
    path = tmp_path / "vpt_deep.yaml"
    path.write_text("vpt: {depth: 12, dims: 10}\n")
    assert main(["subnet", "show", str(path), "--space", "vpt_only", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["subnet"] == "vpt=10x12"
    assert info["in_space"] is True and info["in_budget"] is None  # vpt_only has no budget
    assert info["params"] == 12 * 10 * 768
    # NOAH's VTAB space always has all three modules (depths >= 3): VPT alone is not in it.
    assert main(["subnet", "show", str(path), "--space", "noah_vtab", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["in_space"] is False
    assert main(["subnet", "show", str(path), "--space", "lora_only"]) == 0
    assert "in space      no (modules not in the space: vpt)" in capsys.readouterr().out
    # deeper than the space's backbone (tiny_cpu: 6 blocks): one line, no costs of blocks
    # that do not exist, for VPT as for LoRA
    for kind in ("vpt", "lora"):
        path.write_text(f"{kind}: {{depth: 12, dims: 4}}\n")
        message = f"not a subnet of --space tiny_cpu: its modules span more blocks ({kind} 12)"
        one_error(capsys, ["subnet", "show", str(path), "--space", "tiny_cpu"], message)


def test_data_prepare_check_and_few_shot(tmp_path, capsys):
    out = tmp_path / "mv"
    args = ["data", "prepare", "mini-vtab", "--out", str(out), "--tasks", "digits"]
    assert main([*args, "--test-size", "60"]) == 0
    assert (out / "digits" / "train800.txt").is_file() and (out / "manifest.json").is_file()
    assert main(["data", "check", str(out / "digits")]) == 0
    assert re.search(r"^test\s+60 images, 10 classes", capsys.readouterr().out, re.M)
    # its targets (targets/<name>.txt) are read in its label space and decoded too
    (out / "digits" / "targets").mkdir()
    test_lines = (out / "digits" / "test.txt").read_text().splitlines()
    (out / "digits" / "targets" / "few.txt").write_text("\n".join(test_lines[:10]) + "\n")
    assert main(["data", "check", str(out / "digits")]) == 0
    assert re.search(r"^target few\s+10 images, \d+ of the 10 classes", capsys.readouterr().out,
                     re.M)  # fmt: skip
    train = (out / "digits" / "train800.txt").read_text()
    (out / "digits" / "targets" / "leak.txt").write_text(train)
    one_error(capsys, ["data", "check", str(out / "digits")], "target 'leak' of dataset digits "
              "lists 800 image(s) of its train split")  # fmt: skip
    shutil.rmtree(out / "digits" / "targets")
    assert main(["data", "check", str(out / "digits" / "images"), "--format", "imagefolder"]) == 0
    assert (
        main(
            [
                "data",
                "few-shot",
                str(out / "digits" / "images"),
                "--out",
                str(tmp_path / "fs"),
                "--shots",
                "1",
                "2",
                "--seeds",
                "0",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(["data", "check", str(tmp_path / "fs"), "--format", "few-shot", "--shots", "2"]) == 0
    )
    # The ImageFolder holds train/val/test folders as its 3 "classes": 2 shots each.
    assert re.search(r"^train\s+6 images, 3 classes", capsys.readouterr().out, re.M)
    assert main(["data", "check", str(out / "nowhere")]) == 2
    assert "VTAB-1k dataset folder not found" in capsys.readouterr().err
    assert main(["data", "prepare", "mini-vtab", "--out", str(out), "--tasks", "imagenet"]) == 2
    assert "unknown mini-vtab task(s) ['imagenet']" in capsys.readouterr().err


def one_error(capsys, argv: list[str], message: str) -> None:
    """``argv`` ends with exit status 2 and ``message`` on stderr, without a traceback."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err, err


def test_bad_data_arguments_are_refused_up_front(tmp_path, capsys, mini_vtab_data):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    images = tmp_path / "folders"
    for line in (mini_vtab_data / "digits" / "train800.txt").read_text().splitlines():
        path, label = line.rsplit(" ", 1)
        (images / label).mkdir(parents=True, exist_ok=True)
        (images / label / path.rsplit("/", 1)[-1]).write_bytes(
            (mini_vtab_data / "digits" / path).read_bytes()
        )
    few = ["data", "few-shot", str(images), "--out", str(tmp_path / "fs")]
    prep = ["data", "prepare", "mini-vtab", "--tasks", "digits"]
    one_error(capsys, [*few, "--shots", "0"], "--shots: expected an integer >= 1, got 0")
    one_error(capsys, [*few, "--seeds", "-1"], "--seeds: expected an integer >= 0, got -1")
    one_error(capsys, [*few, "--val-per-class", "0"], "--val-per-class: expected an integer >= 1")
    one_error(capsys, [*few, "--test-fraction", "1.5"], "expected a fraction between 0 and 1")
    one_error(capsys, [*prep, "--out", str(tmp_path), "--test-size", "0"], "expected an integer")
    one_error(capsys, [*prep, "--out", str(a_file)], f"--out {a_file}: {a_file} is a file")
    one_error(capsys, [*few[:3], "--out", str(a_file / "x")], f"{a_file} is a file, not a folder")
    # Few-shot lists are never rewritten with other contents: that would move images that
    # earlier lists train on into val or test.
    assert main([*few, "--shots", "1", "2", "--seeds", "0", "--val-per-class", "3"]) == 0
    assert main([*few, "--shots", "1", "2", "--seeds", "0", "--val-per-class", "3"]) == 0
    one_error(capsys, [*few, "--shots", "2", "--val-per-class", "4"], "already written with other")


def test_preparing_another_task_keeps_the_manifest_of_the_first(tmp_path):
    out = tmp_path / "mv"
    for task in ("digits", "textures"):
        args = ["data", "prepare", "mini-vtab", "--out", str(out), "--tasks", task]
        assert main([*args, "--test-size", "30"]) == 0
    assert sorted(json.loads((out / "manifest.json").read_text())["tasks"]) == [
        "digits",
        "textures",
    ]


def test_bad_report_sources_are_one_clear_error(tmp_path, capsys):
    import sqlite3

    broken = tmp_path / "results.json"
    broken.write_text("{broken")
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("create table t (x int)")
    port = free_port()  # bound, then released: nothing listens
    report = ["report"]
    one_error(capsys, [*report, str(broken)], "not a results file of `nas run`")
    one_error(capsys, [*report, str(tmp_path / "nowhere")], "no such run folder or results file")
    one_error(capsys, [*report, str(other)], "is an MLflow sqlite store: give it as a URI")
    one_error(capsys, [*report, f"sqlite:///{other}"], "is an sqlite database but not an MLflow")
    one_error(capsys, [*report, f"sqlite:///{broken}"], "is not an sqlite database")
    missing = tmp_path / "missing.db"
    one_error(capsys, [*report, f"sqlite:///{missing}"], "no such MLflow store")
    assert not missing.exists()  # not created
    one_error(capsys, [*report, "mlfow://host"], "unsupported scheme 'mlfow'")
    one_error(capsys, [*report, f"http://127.0.0.1:{port}"], "no MLflow server answers there")
    one_error(
        capsys,
        [*report, str(tmp_path), "--markdown", str(tmp_path / "no" / "t.md")],
        f"--markdown {tmp_path / 'no' / 't.md'}: folder {tmp_path / 'no'} does not exist",
    )


def test_subnet_show_says_in_budget_for_a_subnet_outside_the_space(tmp_path, capsys):
    """Budget and space are two questions: a small subnet of dims the space lacks is under
    the budget (it said "in budget: no" before)."""
    path = tmp_path / "lora3.yaml"
    path.write_text("lora: {depth: 2, dims: 3}\n")  # tiny_cpu's LoRA dims are 0, 2, 4, 8
    assert main(["subnet", "show", str(path), "--space", "tiny_cpu"]) == 0
    out = capsys.readouterr().out
    assert "in space      no  (tiny-cpu)" in out
    assert "in budget     yes  (params <= 40,000)" in out


def test_held_out_classes_of_bad_input_are_one_line_each(tmp_path, capsys):
    """Classes of issue 38's held-out probe, each with a case of this test's own making."""
    # `--tasks` with no task is not "every task"
    one_error(capsys, ["data", "prepare", "mini-vtab", "--out", str(tmp_path / "d"), "--tasks"],
              "expected at least one argument")  # fmt: skip
    # an older results.json without roles: its rows' roles read from their labels
    old = {
        "rows": [
            {
                "dataset": "digits",
                "seed": 0,
                "label": lab,
                "test_acc": acc,
                "params": 10,
                "added_flops": 0,
                "subnet_str": lab,
                "val_acc": None,
            }
            for lab, acc in (("rank1", 0.9), ("rank2", 0.95), ("baseline-lora", 0.8))
        ],
        "per_dataset": {"digits": 0.9},
        "group_means": {},
        "mean_of_groups": None,
        "flat_mean": 0.9,
    }
    (tmp_path / "results.json").write_text(json.dumps(old))
    assert main(["report", str(tmp_path / "results.json"), "--by-method"]) == 0
    table = capsys.readouterr().out
    assert "| digits |  | 90.0 | 80.0 |" in table  # rank2 is never reported
    # a read-only folder for --markdown
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if not os.access(locked, os.W_OK):  # root writes anywhere: nothing to refuse then
        one_error(capsys, ["report", str(tmp_path / "results.json"), "--markdown",
                           str(locked / "t.md")], "not writable by this user")  # fmt: skip
    # a file that cannot be written (a folder of the kernel's virtual files): one line
    noah = tmp_path / "noah.yaml"
    noah.write_text("RETRAIN:\n  LORA_DIM: [1,0,0,0,0,0,0,0,0,0,0,0]\n")
    one_error(capsys, ["subnet", "import-noah", str(noah), "--out", "/proc/nas-x.yaml"],
              "nas: error: /proc/nas-x.yaml: No such file or directory")  # fmt: skip
    # `--progress live` into a pipe, and a spec from a pipe (process substitution)
    spec = tmp_path / "s.yaml"
    spec.write_text(
        "name: s\ndatasets: [{name: digits, format: mini-vtab}]\nbackbone: vit_fmnist\n"
        "space: tiny_cpu\n"
    )
    one_error(capsys, ["run", str(spec), "--output", ""], "output: expected a folder path, got an "
              "empty string")  # fmt: skip
    nas = [sys.executable, "-m", "nas"]
    live = subprocess.run([*nas, "run", str(spec), "--progress", "live"], capture_output=True,
                          text=True, cwd=tmp_path)  # fmt: skip
    assert live.returncode == 2 and "--progress live redraws one view" in live.stderr
    assert "Traceback" not in live.stderr
    piped = subprocess.run(["bash", "-c", f"{' '.join(nas)} run <(cat {spec})"],
                           capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert piped.returncode == 2 and "not a regular file (a pipe" in piped.stderr, piped.stderr
    assert not (tmp_path / "runs").exists()
