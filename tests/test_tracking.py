"""MLflow tracking on a real sqlite store: runs found again by their tags, candidates logged
once, and a candidate run that a kill left half-written completed instead of duplicated."""

from __future__ import annotations

from nas.tracking import CandidateLogger, Tracker


def test_a_half_logged_candidate_is_completed_not_duplicated(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "t")
    tags = {"stage": "search", "dataset": "d"}
    parent = tracker.run("search d", tags)
    assert tracker.run("search d", tags) == parent  # found again by its tags
    # A kill between creating a candidate's run and finishing it leaves it RUNNING, empty.
    stale = tracker.client.create_run(
        tracker.experiment_id,
        tags={"nas.candidate": "a", "mlflow.parentRunId": parent},
        run_name="a",
    ).info.run_id
    logger = CandidateLogger(tracker, parent, tags)
    for key in ("a", "b", "a"):
        logger.log(key, key, {"vpt.depth": 2}, {"val_acc": 0.5})
    logger.close()
    children = tracker.children(parent)
    assert set(children) == {"a", "b"}
    assert children["a"] == (stale, "FINISHED")
    assert children["b"][1] == "FINISHED"
    run = tracker.client.get_run(stale)
    assert run.data.metrics["val_acc"] == 0.5 and run.data.params["vpt.depth"] == "2"
    # A second logger (the run resumed again) logs nothing new.
    again = CandidateLogger(tracker, parent, tags)
    again.log("a", "a", {"vpt.depth": 2}, {"val_acc": 0.5})
    again.close()
    assert len(tracker.children(parent)) == 2


def test_a_reopened_run_gets_the_params_a_stop_kept_from_it(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "t")
    tags = {"stage": "hparams", "dataset": "d", "label": "supernet"}
    # A stop between creating the run and logging its params leaves it without them.
    stale = tracker.client.create_run(
        tracker.experiment_id, tags={f"nas.{k}": v for k, v in tags.items()}, run_name="hp"
    ).info.run_id
    tracker.client.log_param(stale, "lrs", "[0.001, 0.01]")
    run_id = tracker.run("hp", tags, params={"lrs": [0.001, 0.01], "chosen_lr": 0.01})
    assert run_id == stale
    assert tracker.client.get_run(run_id).data.params == {
        "lrs": "[0.001, 0.01]",
        "chosen_lr": "0.01",
    }
    assert tracker.run("hp", tags, params={"chosen_lr": 0.01}) == stale  # nothing to add
