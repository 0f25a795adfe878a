"""MLflow tracking on a real sqlite store: runs found again by their tags, candidates logged
once, and a candidate run that a kill left half-written completed instead of duplicated."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from nas.core.errors import NasError
from nas.tracking.candidates import CandidateLogger
from nas.tracking.runs import Tracker


@pytest.mark.parametrize("processes", [1, 3])
def test_a_half_logged_candidate_is_completed_not_duplicated(tmp_path, processes):
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
    logger = CandidateLogger(tracker, parent, tags, processes)
    keys = ["a", "b", "a", *map(str, range(10))]
    for key in keys:
        logger.log(key, key, {"vpt.depth": 2}, {"val_acc": 0.5})
    logger.close()
    children = tracker.children(parent)
    assert set(children) == set(keys)
    assert all(status == "FINISHED" for _, status in children.values())
    assert children["a"] == (stale, "FINISHED")
    assert children["b"][1] == "FINISHED"
    run = tracker.client.get_run(stale)
    assert run.data.metrics["val_acc"] == 0.5 and run.data.params["vpt.depth"] == "2"
    # A second logger (the run resumed again) logs nothing new.
    again = CandidateLogger(tracker, parent, tags, processes)
    again.log("a", "a", {"vpt.depth": 2}, {"val_acc": 0.5})
    again.close()
    assert len(tracker.children(parent)) == len(set(keys))


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


def test_a_candidate_mlflow_refuses_is_one_clear_error_at_close(tmp_path):
    """The logging process reports the first candidate MLflow refused, by its key."""
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "t")
    parent = tracker.run("search d", {"stage": "search"})
    stale = tracker.client.create_run(
        tracker.experiment_id,
        tags={"nas.candidate": "a", "mlflow.parentRunId": parent},
        run_name="a",
    ).info.run_id
    tracker.client.log_param(stale, "vpt.depth", "3")  # MLflow never changes a param's value
    logger = CandidateLogger(tracker, parent, {"stage": "search"}, processes=2)
    logger.log("b", "b", {"vpt.depth": 1}, {"val_acc": 0.25})
    logger.log("a", "a", {"vpt.depth": 2}, {"val_acc": 0.5})
    logger.log("c", "c", {"vpt.depth": 1}, {"val_acc": 0.75})
    with pytest.raises(NasError, match=r"MLflow logging failed: candidate 'a': .*vpt\.depth"):
        logger.close()
    logger.close()  # closing again raises nothing more
    assert tracker.children(parent)["b"][1] == "FINISHED"


def test_a_tracking_server_logs_candidates_without_a_false_error(mlflow_server, monkeypatch):
    """Through a real `mlflow server`, MLflow prints "View run ..." on stdout whenever a run
    ends: that is chatter, not an error. Every candidate is logged once and FINISHED, and the
    experiment's artifacts go through the server's proxy, not to a local folder."""
    # nas turns MLflow's URL printing off; a user may turn it on: it must stay harmless
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false")
    tracker = Tracker(mlflow_server, "served")
    assert tracker.client.get_experiment(tracker.experiment_id).artifact_location.startswith(
        "mlflow-artifacts:"
    )
    tags = {"stage": "search", "dataset": "d"}
    parent = tracker.run("search d", tags)
    logger = CandidateLogger(tracker, parent, tags, processes=2)
    for key in map(str, range(6)):
        logger.log(key, key, {"vpt.depth": 2}, {"val_acc": 0.5})
    logger.close()  # raised "MLflow logging failed: 🏃 View run ..." before
    children = tracker.children(parent)
    assert sorted(children) == list(map(str, range(6)))
    assert {status for _, status in children.values()} == {"FINISHED"}


def test_a_killed_search_leaves_its_loggers_to_finish_and_nothing_running(tmp_path):
    """What a stop does (``driver.stop_tracking``): the searching process is killed
    (SIGKILL, as Ray ends a trial) right after handing over its candidates; its logging
    processes hold the lock until they have logged every one of them, the driver waits on
    that lock, then marks what is still open KILLED. Every scored candidate ends up in MLflow,
    FINISHED, and no run stays RUNNING."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    from nas.tracking.candidates import wait_for_loggers

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "t")
    tags = {"stage": "search", "spec_hash": "h"}
    parent = tracker.run("search d", tags)
    lock = tmp_path / ".loggers.lock"
    ready = tmp_path / "ready"
    script = textwrap.dedent(
        f"""
        import pathlib, time
        from nas.tracking.candidates import CandidateLogger
        from nas.tracking.runs import Tracker
        tracker = Tracker({uri!r}, "t")
        lock = pathlib.Path({str(lock)!r})
        logger = CandidateLogger(tracker, {parent!r}, {tags!r}, processes=2, lock=lock)
        for i in range(40):
            logger.log(str(i), str(i), {{"vpt.depth": 2}}, {{"val_acc": 0.5}})
        pathlib.Path({str(ready)!r}).write_text("sent")
        time.sleep(600)  # killed here, its loggers still busy
        """
    )
    search = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[1])
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert search.poll() is None and time.time() < deadline, "the search did not start"
            time.sleep(0.1)
    finally:
        os.kill(search.pid, signal.SIGKILL)
        search.wait()
    assert wait_for_loggers([lock], seconds=120)
    tracker.stop_running(tags)
    children = tracker.children(parent)
    assert sorted(children, key=int) == [str(i) for i in range(40)]
    assert {status for _, status in children.values()} == {"FINISHED"}
    open_runs = tracker.client.search_runs(
        [tracker.experiment_id], "attributes.status = 'RUNNING'", max_results=100
    )
    assert not open_runs
