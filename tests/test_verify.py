"""The verify stage (issue 37) through real Ray and MLflow, killed with SIGKILL while it runs
and resumed; and a retraining that diverges caught and retried, without Ray."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from nas.pipeline.retrain import MAX_RETRIES, RETRY_LR_FACTOR, divergence, run_retrain
from nas.pipeline.tasks import RetrainTask
from nas.search.anchors import anchors
from nas.space.search_space import load_space
from nas.space.subnet import Subnet
from tests.test_pipeline import kill_when, mlflow_runs, run_to_end

SPEC = {
    "name": "verify",
    "datasets": [{"name": "digits", "format": "mini-vtab"}],
    "backbone": "vit_fmnist",
    "space": "tiny_cpu",
    "seeds": [0],
    "resources": {"cpus": 1, "gpus": 0},
    "stages": {
        "supernet": {"epochs": 1, "batch_size": 64, "lr": 5.0e-3, "warmup_epochs": 0},
        "search": {
            "algorithm": "evolution",
            "options": {"generations": 2, "population": 10, "top_k": 3, "mutations": 3},
        },
        # 2 from the search, then the anchors; halved after 1 and 2 epochs
        "verify": {"enabled": True, "top_k": 2, "epochs": 3, "grace_period": 1,
                   "reduction_factor": 2},
        "retrain": {"top_k": 1, "epochs": 2, "lr": 5.0e-3, "warmup_epochs": 0,
                    "baselines": {"lora2": {"lora": {"depth": 2, "dims": 2}}}},
    },
}  # fmt: skip


@pytest.mark.xdist_group("verify")
def test_verify_picks_on_val_resumes_after_kill_and_is_tracked(tmp_path, small_mini_vtab):
    spec = {**SPEC, "datasets": [{**SPEC["datasets"][0], "root": str(small_mini_vtab)}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "run"
    folder = out / "verify" / "digits-seed0"

    def verifying() -> bool:  # a candidate has finished an epoch; the ranking is not written
        return any(folder.glob("c*.json")) and not (folder / "done.json").is_file()

    kill_when(tmp_path / "spec.yaml", out, small_mini_vtab, verifying)
    assert not (folder / "done.json").is_file()
    log = run_to_end(tmp_path / "spec.yaml", out, small_mini_vtab)
    assert "== verify: 1 of 1 verifications to run" in log

    done = json.loads((folder / "done.json").read_text())
    search = json.loads((out / "search" / "digits-seed0" / "done.json").read_text())
    space = load_space("tiny_cpu")
    lora2 = Subnet({"lora": (2, 2)})
    listed = [Subnet.from_data(c["subnet"]) for c in search["top"][:2]]
    for a in anchors(space, [lora2]):
        if a not in listed:
            listed.append(a)
    top = done["top"]
    assert [Subnet.from_data(c["subnet"]) for c in sorted(top, key=lambda c: c["label"])] == listed
    assert done["candidates"] == len(listed) >= 6
    # successive halving: every candidate ran an epoch, some were stopped, the best went on
    epochs = Counter(c["epochs"] for c in top)
    assert epochs[3] >= 1 and sum(n for e, n in epochs.items() if e < 3) >= 1
    # the winner: trained longest, then best on val; the retraining retrains it
    longest = [c for c in top if c["epochs"] == 3]
    assert top[0]["epochs"] == 3 and top[0]["score"] == max(c["score"] for c in longest)
    for c in top:  # each score is its own run's last val accuracy
        rec = json.loads((folder / f"{c['label']}.json").read_text())
        assert c["score"] == rec["history"][-1]["val_acc"] and c["epochs"] == len(rec["history"])
    assert {c["origin"] for c in top} >= {"search rank 1", "anchor", "baseline lora2"}
    assert done["seconds"] > 0 and done["epochs_trained"] == sum(c["epochs"] for c in top)
    rank1 = json.loads((out / "retrain" / "digits-seed0" / "rank1" / "done.json").read_text())
    assert rank1["subnet"] == top[0]["subnet"] and rank1["val_acc"] == top[0]["score"]

    # MLflow: one verification run with a finished child per candidate, linked to the search's
    # candidate run of the same subnet; the winner tagged; nothing left RUNNING by the kill.
    _, runs = mlflow_runs(out, "verify")
    assert all(r.info.status == "FINISHED" for r in runs)
    by_id = {r.info.run_id: r for r in runs}
    (parent,) = [
        r
        for r in runs
        if r.data.tags.get("nas.stage") == "verify" and "mlflow.parentRunId" not in r.data.tags
    ]
    assert parent.data.params["eval_split"] == "val"
    assert parent.data.metrics["verify_seconds"] == pytest.approx(done["seconds"], abs=0.01)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(listed)
    for child in children:
        key = child.data.tags["nas.candidate"]
        candidate = by_id[child.data.tags["nas.candidate_run_id"]]  # anchors were in round 0
        assert candidate.data.tags["nas.candidate"] == key
        assert candidate.data.tags["mlflow.parentRunId"] == search["mlflow_run_id"]
    (winner,) = [c for c in children if c.data.tags.get("nas.chosen") == "verified"]
    assert winner.data.tags["nas.candidate"] == top[0]["key"]
    retrain = by_id[rank1["mlflow_run_id"]]
    assert retrain.data.tags["nas.verify_run_id"] == winner.info.run_id


def test_divergence_rule():
    assert divergence(None, 2.0, verified=0.3) is not None  # 2.0 > max(0.6, 0.8)
    assert divergence(None, 0.7, verified=0.3) is None
    assert divergence(None, 0.4, verified=0.01) is None  # within 0.5 of a tiny loss
    assert divergence(1.2, 1.5, verified=None) is not None  # worse than its first epoch
    assert divergence(1.2, 0.4, verified=None) is None
    assert divergence(None, 5.0, verified=None) is None  # nothing to compare with


def test_a_diverging_retrain_is_retried_at_a_lower_rate_and_reported(tmp_path, small_mini_vtab):
    """A retraining whose loss ends far above its verified run's is started again at a
    quarter of its rate, at most twice; every attempt is an MLflow run, the diverged ones
    FAILED and tagged, and the result says so (run here in-process, without Ray)."""
    spec = {
        **SPEC,
        "datasets": [{**SPEC["datasets"][0], "root": str(small_mini_vtab)}],
        "stages": {"search": {"enabled": False}, "retrain": SPEC["stages"]["retrain"]},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "run"
    task = RetrainTask(
        spec=str(tmp_path / "spec.yaml"),
        spec_abs=str(tmp_path / "spec.yaml"),
        output=str(out),
        dataset="digits",
        seed=0,
        label="rank1",
        role="searched",
        subnet={"lora": {"depth": 2, "dims": 2}},
        verified_loss=1e-4,  # no one-epoch retraining comes near it: every attempt "diverges"
    )
    result = run_retrain(task)
    # a searched subnet without a sweep retrains at the supernet's rate (its default: 5e-4)
    lrs = [a["lr"] for a in result["retries"]] + [result["lr"]]
    assert lrs == pytest.approx([5e-4 * RETRY_LR_FACTOR**i for i in range(MAX_RETRIES + 1)])
    assert "against 0.0001 when verified" in result["diverged"]
    attempts = json.loads(
        (out / "retrain" / "digits-seed0" / "rank1" / "attempts.json").read_text()
    )
    assert attempts == result["retries"]
    _, runs = mlflow_runs(out, "verify")
    statuses = Counter(r.info.status for r in runs if r.data.tags.get("nas.stage") == "retrain")
    assert statuses == {"FAILED": MAX_RETRIES, "FINISHED": 1}
    assert all("nas.diverged" in r.data.tags for r in runs)
    # done: a rerun returns the result without training again
    assert run_retrain(task) == json.loads(
        Path(out / "retrain/digits-seed0/rank1/done.json").read_text()
    )


def test_turning_verification_on_after_the_search_continues_the_run(tmp_path):
    from nas.pipeline.preflight import unstarted_stage

    (tmp_path / "search" / "digits-seed0").mkdir(parents=True)
    (tmp_path / "search" / "digits-seed0" / "done.json").write_text("{}")
    assert unstarted_stage(tmp_path, ["verify.enabled", "verify.top_k"]) == "verify"
    assert unstarted_stage(tmp_path, ["search.options"]) is None  # the search has run
    sweep = tmp_path / "hparams" / "digits" / "searched-rank1-seed0"
    sweep.mkdir(parents=True)
    (sweep / "done.json").write_text("{}")  # swept the search's pick, not the verified one
    assert unstarted_stage(tmp_path, ["verify.enabled"]) is None
    assert unstarted_stage(tmp_path, ["retrain.epochs"]) == "retrain"
