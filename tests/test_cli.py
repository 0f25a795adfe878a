"""The ``nas space`` command: summaries, validation, and errors without tracebacks."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from nas.cli import main
from tests.conftest import REPO, small_space_yaml


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


def test_data_prepare_check_and_few_shot(tmp_path, capsys):
    out = tmp_path / "mv"
    args = ["data", "prepare", "mini-vtab", "--out", str(out), "--tasks", "digits"]
    assert main([*args, "--test-size", "60"]) == 0
    assert (out / "digits" / "train800.txt").is_file() and (out / "manifest.json").is_file()
    assert main(["data", "check", str(out / "digits")]) == 0
    assert re.search(r"^test\s+60 images, 10 classes", capsys.readouterr().out, re.M)
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
