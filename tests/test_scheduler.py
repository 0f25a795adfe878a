"""GroupedASHA: many sweeps in one Tune run, each point compared only with its own sweep.
Driven directly with stand-in trials (the scheduler reads only a trial's id and config)."""

from __future__ import annotations

from types import SimpleNamespace

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from nas.pipeline.ray_layer import GroupedASHA

ASHA = {"metric": "val_acc", "mode": "max", "max_t": 4, "grace_period": 1, "reduction_factor": 2}


def trial(tid: str, group: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=tid, config={"task": {"group": group}})


def decisions(scheduler, scores: dict[str, float], groups: dict[str, str]) -> dict[str, str]:
    trials = {tid: trial(tid, groups[tid]) for tid in scores}
    for t in trials.values():
        scheduler.on_trial_add(None, t)
    return {
        tid: scheduler.on_trial_result(None, trials[tid], {"training_iteration": 1, "val_acc": acc})
        for tid, acc in scores.items()
    }


def test_points_are_stopped_only_by_their_own_sweep():
    # A strong method's two points report first, then a weak method's two points.
    scores = {"a1": 0.9, "a2": 0.8, "b1": 0.3, "b2": 0.2}
    groups = {"a1": "digits/lora", "a2": "digits/lora"} | {b: "digits/linear" for b in ("b1", "b2")}
    # One ASHA over everything stops the weak method's every point at the first rung ...
    assert decisions(ASHAScheduler(**ASHA), scores, groups) == {
        "a1": TrialScheduler.CONTINUE,
        "a2": TrialScheduler.STOP,
        "b1": TrialScheduler.STOP,
        "b2": TrialScheduler.STOP,
    }
    # ... grouped, each sweep keeps its own best point and stops only its own worse one.
    grouped = GroupedASHA("group", **ASHA)
    assert decisions(grouped, scores, groups) == {
        "a1": TrialScheduler.CONTINUE,
        "a2": TrialScheduler.STOP,
        "b1": TrialScheduler.CONTINUE,
        "b2": TrialScheduler.STOP,
    }
    assert sorted(grouped.groups) == ["digits/linear", "digits/lora"]


def test_a_point_reaching_max_t_stops_and_completion_is_routed_to_its_group():
    grouped = GroupedASHA("group", **ASHA)
    t = trial("x", "clevr/supernet")
    grouped.on_trial_add(None, t)
    result = {"training_iteration": 4, "val_acc": 0.5}
    assert grouped.on_trial_result(None, t, result) == TrialScheduler.STOP
    grouped.on_trial_complete(None, t, result)
    assert grouped.groups["clevr/supernet"]._trial_info == {}


def test_a_sweep_won_at_the_grids_edge_is_flagged():
    from nas.pipeline.hparams import grid_edge_note

    assert grid_edge_note(5e-3, [1e-3, 5e-3, 2e-2]) is None
    assert grid_edge_note(2e-2, [1e-3]) is None  # nothing to widen from one point
    note = grid_edge_note(2e-2, [1e-3, 5e-3, 2e-2])
    assert note is not None and "0.02, is the largest of the grid [0.001, 0.005, 0.02]" in note
    assert "smallest" in grid_edge_note(1e-3, [2e-2, 1e-3, 5e-3])


def test_the_stages_trial_code_does_not_import_ray():
    """House rule: training and evaluation know nothing about Ray. A fresh interpreter that
    imports every stage module (what a trial runs) has not loaded Ray; only the driver's side
    (ray_layer) does."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from nas.pipeline import context, hparams, layout, preflight, progress, provenance, "
        "reports, retrain, stage, subnet_search, supernet, tasks\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_progress_events_give_tune_their_numbers_and_the_log_its_line():
    from nas.pipeline.progress import EpochProgress, SearchProgress, SweepProgress

    train = {"train_loss": 0.5, "train_acc": 0.75, "lr": 1e-4}
    point = SweepProgress(
        "hparams", "digits", 0, label="supernet", eta_s=12.4, epoch=2, epochs=3,
        metrics=train, lr=5e-3, weight_decay=1e-4, module_lr={"lora": 4.0}, val_acc=0.8125,
    )  # fmt: skip
    # the point's own rate wins over the scheduled one; ASHA reads val_acc
    assert point.numbers() == {
        "seed": 0, "eta_s": 12.4, "epoch": 2, "epochs": 3, "train_loss": 0.5,
        "train_acc": 0.75, "lr": 5e-3, "weight_decay": 1e-4, "val_acc": 0.8125,
    }  # fmt: skip
    assert point.line() == (
        "[hparams digits seed 0 supernet] lr 0.005 lora x4 wd 0.0001 epoch 2/3: "
        "val acc 0.8125, ~12 s left"
    )
    epoch = EpochProgress("retrain", "digits", 1, label="rank1", epoch=1, epochs=5, metrics=train)
    assert epoch.line() == "[retrain digits seed 1 rank1] epoch 1/5: loss 0.5000, train acc 0.7500"
    assert "eta_s" not in epoch.numbers()
    search = SearchProgress("search", "d", 2, eta_s=3, round=1, evaluated=16, planned=48,
                            best_val_acc=0.9)  # fmt: skip
    assert (
        search.line()
        == "[search d seed 2] round 1: 16/48 candidates, best val acc 0.9000, ~3 s left"
    )
    assert search.numbers()["best_val_acc"] == 0.9


def test_tasks_travel_through_tune_as_data_and_come_back_typed():
    """A task goes into Tune's config as plain data and a trial rebuilds the same typed task;
    every stage name the Ray layer runs resolves to a stage whose tasks and markers agree."""
    from nas.pipeline.stage import STAGES, stage
    from nas.pipeline.tasks import RetrainTask, SweepPoint, Task, VerifyPoint, task_from_config

    base = {"spec": "s.yaml", "spec_abs": "/x/s.yaml", "output": "/x/out"}
    tasks = [
        Task(**base, dataset="d", seed=1),
        SweepPoint(
            **base,
            dataset="d",
            seed=0,
            method="supernet",
            lr=1e-3,
            weight_decay=0.0,
            group="d/supernet",
            module_lr={"pgn": 4.0},
        ),
        RetrainTask(
            **base,
            dataset="d",
            seed=2,
            label="rank1",
            role="searched",
            subnet={"lora": {"depth": 2, "dims": 4}},
            val_acc=0.5,
            verified_loss=0.25,
        ),
        VerifyPoint(
            **base,
            dataset="d",
            seed=1,
            label="c03",
            subnet={
                "pgn": {"prompts": 8, "library": 64, "generator": "resnet10", "resolution": 28}
            },
            origin="anchor, baseline pgn",
            group="d-seed1",
            search_val_acc=0.75,
        ),
    ]
    for task in tasks:
        config = task.to_config()
        assert all(isinstance(v, str | int | float | dict | bool | None) for v in config.values())
        assert task_from_config(config) == task
    assert tasks[1].describe() == "d seed 0 supernet lr 0.001 wd 0 pgn x4"
    assert tasks[2].describe() == "d seed 2 rank1"
    assert tasks[3].describe() == "d seed 1 c03"
    assert set(STAGES) == {"hparams", "supernet", "search", "supernet+search", "verify", "retrain"}
    for name in STAGES:
        assert stage(name).name == name and callable(stage(name).run)
