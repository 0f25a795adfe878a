"""Every shipped protocol's splits, as README's table states them, checked against what real
runs recorded (issue 23): per stage, the MLflow run's ``data.<split>.sha256`` keys name exactly
the splits the table gives that stage, and each hash is that split's decoded content."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from nas.pipeline import context
from nas.spec.experiment import load_spec
from tests.conftest import shorten_mini_vtab
from tests.test_dg import TARGETS
from tests.test_pipeline import mlflow_runs, run_to_end
from tests.test_splits import SHOTS, write_formats

# Its module-scoped fixtures run once: under pytest-xdist every test here goes to one worker.
pytestmark = pytest.mark.xdist_group("protocols")

REPO = Path(__file__).resolve().parents[1]

#: README's protocol table, row by row, with the splits each row names per stage as the runs
#: record them: (the row as README prints it, {stage: splits}).
ROWS = {
    "vtab": (
        "| VTAB-1k (VPT, NOAH), mini-VTAB | `format: vtab`, `mini-vtab` | train800 → val200 "
        "| train800 | val200 | train800val200 | test |",
        {"trainval", "test"},
    ),
    "few-shot": (
        "| few-shot (NOAH) | `format: few-shot` | K shots → val list | K shots | val list "
        "| the K shots alone | test list |",
        {"train", "test"},
    ),
    "coop": (
        "| CoOp's few-shot (CLIP) | `format: few-shot`, a CLIP backbone | K shots → val list "
        "| K shots | val list | the K shots alone | test list |",
        {"train", "test"},
    ),
    "imagefolder": (
        "| ImageFolder | `format: imagefolder` | train → val | train | val | train + val | test |",
        {"trainval", "test"},
    ),
    "dg": (
        "| domain generalisation (NOAH) | `targets:` on a source dataset | the source's, as its "
        "format | the source's | the source's val | the source's retraining split "
        "| the source's test, then every target |",
        {"trainval", "test", *(f"target/{t}" for t in TARGETS)},
    ),
}
#: What every protocol's other stages read: the sweep trains on train and scores on val, the
#: supernet trains on train, the search scores on val.
EARLY = {"hparams": {"train", "val"}, "supernet": {"train"}, "search": {"val"}}


def test_readme_states_every_protocol_row():
    readme = (REPO / "README.md").read_text()
    header = (
        "| protocol | spec | hparams sweep (train → scored) | supernet trains on "
        "| search scores on | retrain (winner, baselines) | tested once on |"
    )
    assert header in readme
    for row, _ in ROWS.values():
        assert row in readme, row


def recorded(out: Path, experiment: str) -> dict[tuple[str, str], list[dict[str, str]]]:
    """(dataset, stage) -> per parent run of the stage (each sweep, each retrained model): its
    data.<split>.sha256 params, keyed by split."""
    _, runs = mlflow_runs(out, experiment)
    found: dict[tuple[str, str], list[dict[str, str]]] = {}
    for run in runs:
        tags, params = run.data.tags, run.data.params
        if "mlflow.parentRunId" in tags or tags.get("nas.stage") not in (*EARLY, "retrain"):
            continue
        found.setdefault((tags["nas.dataset"], tags["nas.stage"]), []).append(
            {
                k.removeprefix("data.").removesuffix(".sha256"): v
                for k, v in params.items()
                if k.startswith("data.") and k.endswith(".sha256")
            }
        )
    return found


def check(spec_path: Path, out: Path, protocols: dict[str, str], retrained: int) -> None:
    """Each dataset's runs read exactly its protocol row's splits, with their contents."""
    from nas.data.decode import decode_split

    spec = load_spec(spec_path, output=out)
    runs = recorded(out, spec.mlflow_experiment)
    g = spec.backbone.geometry()
    for ds in spec.datasets:
        splits = context.read_splits(spec, ds)
        if ds.targets:
            targets = context.target_splits(spec, ds, splits["test"])
            splits |= {f"target/{n}": s for n, s in targets.items()}
        hashes = {
            name: decode_split(split, g.image_size, g.in_chans).content_hash()
            for name, split in splits.items()
        }
        stages = {**EARLY, "retrain": ROWS[protocols[ds.key]][1]}
        # one sweep per method (the supernet, each baseline), each retrained once (one seed)
        counts = {"hparams": retrained, "supernet": 1, "search": 1, "retrain": retrained}
        for stage, names in stages.items():
            got = runs[(ds.key, stage)]
            assert len(got) == counts[stage], (ds.key, stage, len(got))
            for one in got:
                assert set(one) == names, (ds.key, stage, sorted(one))
                assert all(one[n] == hashes[n] for n in names), (ds.key, stage)


LORA4 = {"lora": {"depth": 6, "dims": 4}}
COOP = {"upt": {"mode": "text", "n_ctx": 4}}  # CoOp: 4 learned text-context tokens
STAGES = {
    "hparams": {
        "enabled": True,
        "lrs": [5.0e-3],
        "weight_decays": [1.0e-4],
        "epochs": 1,
        "grace_period": 1,
    },
    "supernet": {"epochs": 1, "warmup_epochs": 0},
    "search": {"algorithm": "random", "options": {"num_candidates": 3, "batch_size": 3}},
    "retrain": {"epochs": 1, "warmup_epochs": 0},
}


@pytest.fixture(scope="module")
def three_formats(tmp_path_factory, small_mini_vtab):
    """The digits task in each format (``tests.test_splits.write_formats``), from the shorter
    lists of ``small_mini_vtab``: what is checked here is which splits each stage read."""
    return write_formats(small_mini_vtab, tmp_path_factory.mktemp("formats"))


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory, three_formats):
    """One run through Ray of every classifier protocol: digits as VTAB-1k, as 2-shot
    few-shot lists and as an ImageFolder, and mnist5k with its four targets (DG)."""
    from nas.data.mini_vtab import prepare

    tmp = tmp_path_factory.mktemp("protocols")
    prepare(tmp / "dg-full", ("mnist5k",), test_size=200, log=lambda *_: None)
    dg_root = shorten_mini_vtab(tmp / "dg-full", tmp / "dg")
    folders = Path(three_formats["imagefolder"]["root"])
    # a name apart from the VTAB copy (the few-shot lists point into folders/digits)
    shutil.copytree(folders / "digits", folders / "digits_folders")
    datasets = [
        {"name": "digits", **three_formats["vtab"]},
        {"name": "digits", **three_formats["few-shot"]},
        {"name": "digits_folders", **three_formats["imagefolder"]},
        {"name": "mnist5k", "format": "mini-vtab", "root": str(dg_root), "targets": TARGETS},
    ]
    spec = {
        "name": "protocols",
        "datasets": datasets,
        "backbone": "vit_fmnist",
        "space": "tiny_cpu",
        "seeds": [0],
        "stages": {
            **STAGES,
            "retrain": {**STAGES["retrain"], "baselines": {"lora4": LORA4}},
        },
    }
    path = tmp / "protocols.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp / "out"
    run_to_end(path, out, dg_root)
    return path, out


def test_vit_protocols_read_the_splits_the_table_states(vit_run):
    path, out = vit_run
    protocols = {
        "digits": "vtab",
        f"digits-{SHOTS}shot-s0": "few-shot",
        "digits_folders": "imagefolder",
        "mnist5k": "dg",
    }
    # the supernet's sweep and the baseline's; the winner and the baseline retrained
    check(path, out, protocols, retrained=2)


def test_a_dg_run_reports_every_target_in_results_mlflow_and_report(vit_run):
    _, out = vit_run
    results = json.loads((out / "results.json").read_text())
    rows = {r["label"]: r for r in results["rows"] if r["dataset"] == "mnist5k"}
    assert set(rows) == {"rank1", "baseline-lora4"}
    for r in rows.values():
        assert list(r["targets"]) == TARGETS
        assert list(r["targets_all_classes"]) == ["sketch"]  # the one subset target
        assert r["target_classes"] == {"uci_digits": 10, "inverted": 10, "noisy": 10, "sketch": 5}
        assert r["targets"]["sketch"] >= r["targets_all_classes"]["sketch"]
    assert results["targets"]["mnist5k"] == rows["rank1"]["targets"]
    # MLflow: test_acc/<target> on the retrain runs, and nowhere else
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("protocols")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    for run in runs:
        m, p = run.data.metrics, run.data.params
        stage = run.data.tags.get("nas.stage")
        has = {k for k in m if k.startswith("test_acc/")}
        source = run.data.tags.get("nas.dataset") == "mnist5k"
        if stage == "retrain" and source and "mlflow.parentRunId" not in run.data.tags:
            label = run.data.tags["nas.label"]
            assert {k.removeprefix("test_acc/") for k in has} == {*TARGETS, "sketch/all_classes"}
            assert m["test_acc/sketch"] == rows[label]["targets"]["sketch"]
            assert m["test_acc/sketch/all_classes"] == rows[label]["targets_all_classes"]["sketch"]
            assert {f"data.target/{t}.sha256" for t in TARGETS} <= set(p)
        else:  # the sweeps, supernet, search, candidates, datasets without targets: none
            assert not has and not any(k.startswith("data.target/") for k in p), stage
    # the report: a column per target (sketch twice) and their mean, from the folder and from
    # the MLflow store alone
    from nas.pipeline.reports import methods_markdown, results_from_mlflow, results_markdown

    rebuilt = results_from_mlflow(f"sqlite:///{out / 'mlflow.db'}", "protocols")
    assert rebuilt["targets"] == results["targets"]
    for text in (results_markdown(results), results_markdown(rebuilt)):
        assert "| sketch (own classes) | sketch (all classes) | targets mean |" in text
    by_method = methods_markdown(rebuilt)
    assert "Domain generalisation, source mnist5k:" in by_method
    header = next(line for line in by_method.splitlines() if line.startswith("| method |"))
    assert header == (
        "| method | mnist5k (source test) | uci_digits | inverted | noisy | "
        "sketch (own classes) | sketch (all classes) | targets mean |"
    )
    assert (
        sum(line.startswith(("| searched |", "| lora4 |")) for line in by_method.splitlines()) == 2
    )
    cli = subprocess.run(
        [sys.executable, "-m", "nas", "report", str(out), "--by-method"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert cli.returncode == 0 and "uci_digits" in cli.stdout and "targets mean" in cli.stdout


@pytest.mark.parametrize("space", ["clip_cpu"])
def test_coop_few_shot_on_a_clip_reads_the_splits_the_table_states(
    tmp_path,
    three_formats,
    space,
):
    spec = {
        "name": "coop-protocol",
        "datasets": [{"name": "digits", **three_formats["few-shot"]}],
        "space": space,
        "seeds": [0],
        "stages": {
            **STAGES,
            "retrain": {
                **STAGES["retrain"],
                "baselines": {"coop": {"upt": {"mode": "text", "n_ctx": 4}}},
            },
        },
    }
    path = tmp_path / "coop.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    run_to_end(path, out, tmp_path)
    # the supernet's sweep and the baseline's; the winner and the baseline retrained
    check(path, out, {f"digits-{SHOTS}shot-s0": "coop"}, retrained=2)
