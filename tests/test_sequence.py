"""StageSequence: the stages of a run as one stream of trials, each dataset on its own lane,
without Ray (the Ray layer only hands its tasks to Tune and their ends back)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from nas.core.errors import NasError
from nas.pipeline.sequence import Ended, StageSequence, Step
from nas.pipeline.stage import Halving, Plan
from nas.pipeline.tasks import Task


@dataclass(frozen=True, kw_only=True)
class Point(Task):
    group: str = ""


def task(dataset: str, seed: int = 0, group: str = "") -> Point:
    return Point(spec="s.yaml", spec_abs="/s.yaml", output="/o", dataset=dataset, seed=seed,
                 group=group)  # fmt: skip


class Clock:
    """A timer that records what started and stopped, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def start(self, stage: str) -> None:
        self.events.append(("start", stage))

    def stop(self, stage: str, ended: str) -> None:
        self.events.append((ended, stage))


def drain(seq: StageSequence) -> list[tuple[int, Task]]:
    """Every task the sequence hands out now."""
    out = []
    while (handed := seq.next_task()) is not None:
        out.append((handed[0], handed[2]))
    return out


FINISHED = {"finished": 1}


def test_each_lane_goes_on_as_soon_as_its_own_stage_ends():
    planned: list[tuple[str, str]] = []

    def step(name: str, seeds: int = 1) -> Step:
        def plan(lane: str) -> Plan:
            planned.append((name, lane))
            return Plan([task(lane, s) for s in range(seeds)], f"== {name}")

        return Step(name, name, plan, lambda t, r: {})

    clock = Clock()
    seq = StageSequence([step("a", seeds=2), step("b")], lanes=["x", "y"], timer=clock)
    assert seq.start() and planned == [("a", "x"), ("a", "y")]
    first = drain(seq)
    assert [(i, t.dataset, t.seed) for i, t in first] == [(0, "x", 0), (0, "x", 1), (0, "y", 0),
                                                          (0, "y", 1)]  # fmt: skip
    seq.ended(0, Ended(first[2][1], FINISHED))
    seq.ended(0, Ended(first[3][1], FINISHED))  # y is through "a": its "b" is planned now
    assert planned[-1] == ("b", "y") and clock.events == [("start", "a"), ("start", "b")]
    assert [(i, t.dataset) for i, t in drain(seq)] == [(1, "y")]
    seq.ended(0, Ended(first[0][1], FINISHED))
    assert drain(seq) == [] and not seq.finished()  # x's second seed still runs
    seq.ended(0, Ended(first[1][1], FINISHED))
    assert ("finished", "a") in clock.events  # its last lane ended it
    (last,) = drain(seq)
    seq.ended(1, Ended(task("y"), FINISHED))
    seq.ended(1, Ended(last[1], FINISHED))
    assert seq.finished() and clock.events[-1] == ("finished", "b")
    seq.raise_errors()  # nothing went wrong


def test_the_earliest_stage_goes_first():
    steps = [Step(n, n, lambda lane, n=n: Plan([task(lane)], ""), lambda t, r: {}) for n in "ab"]
    seq = StageSequence(steps, lanes=["x", "y"])
    seq.start()
    x = seq.next_task()
    seq.ended(0, Ended(x[2], FINISHED))  # x's "b" is ready, but y's "a" is earlier
    assert seq.next_task()[0:1] == (0,) and seq.next_task()[0:1] == (1,)


def test_a_group_ends_before_the_lane_plans_its_next_stage():
    written: dict[str, list] = {}

    def sweep(lane: str) -> Plan:
        tasks = [task(lane, s, group=f"{lane}/g{s % 2}") for s in range(4)]

        def on_group(group, members):
            written[group] = sorted(t.seed for t, _ in members)

        sizes = {f"{lane}/g0": 2, f"{lane}/g1": 2}
        return Plan(tasks, "", Halving(3, 1, 2), sizes, on_group)

    def after(lane: str) -> Plan:
        assert sorted(written) == [f"{lane}/g0", f"{lane}/g1"]  # what the sweep wrote
        return Plan([task(lane)], "")

    seq = StageSequence([Step("h", "h", sweep, print), Step("r", "r", after, print)], ["x"])
    seq.start()
    points = [t for _, t in drain(seq)]
    seq.ended(0, Ended(points[0], {"val_acc": 0.5}))  # stopped early by ASHA: no "finished"
    seq.ended(0, Ended(points[2], {"val_acc": 0.6}))
    assert written == {"x/g0": [0, 2]}
    seq.ended(0, Ended(points[1], FINISHED))
    seq.ended(0, Ended(points[3], FINISHED))
    assert [i for i, _ in drain(seq)] == [1]
    seq.raise_errors()


def test_a_failed_stage_stops_its_lane_only_and_is_raised_at_the_end():
    clock = Clock()
    steps = [Step(n, n, lambda lane: Plan([task(lane)], ""), print) for n in ("a", "b")]
    seq = StageSequence(steps, lanes=["x", "y"], timer=clock, logs="/o/ray/run-1")
    seq.start()
    x, y = (t for _, t in drain(seq))
    seq.ended(0, Ended(x, {}, error="FloatingPointError: loss is nan"))
    seq.ended(0, Ended(y, FINISHED))
    (rest,) = drain(seq)
    assert rest[1].dataset == "y"  # y goes on
    seq.ended(1, Ended(rest[1], FINISHED))
    assert seq.finished()
    assert clock.events == [("start", "a"), ("failed", "a"), ("start", "b"), ("finished", "b")]
    with pytest.raises(NasError) as err:
        seq.raise_errors()
    assert str(err.value) == (
        "a: 1 trial(s) failed after 2 retries:\n  x seed 0: FloatingPointError: loss is nan"
        "\n(trial logs under /o/ray/run-1)"
    )


def test_a_trial_that_ends_unfinished_without_halving_is_an_error():
    seq = StageSequence([Step("a", "a", lambda lane: Plan([task(lane)], ""), print)])
    seq.start()
    ((_, t),) = drain(seq)
    seq.ended(0, Ended(t, {"epoch": 1}))
    with pytest.raises(NasError, match=r"1 trial\(s\) ended before finishing"):
        seq.raise_errors()


def test_a_plan_that_fails_is_raised_as_it_was():
    def broken(lane: str) -> Plan:
        raise KeyError("top")

    clock = Clock()
    steps = [Step("a", "a", lambda lane: Plan([task(lane)], ""), print), Step("b", "b", broken,
                                                                             print)]  # fmt: skip
    seq = StageSequence(steps, timer=clock)
    seq.start()
    ((_, t),) = drain(seq)
    seq.ended(0, Ended(t, FINISHED))
    assert seq.finished() and clock.events[-1] == ("failed", "b")
    with pytest.raises(KeyError, match="top"):
        seq.raise_errors()


def test_stages_with_nothing_to_do_are_passed_and_a_stop_is_recorded():
    clock = Clock()
    steps = [
        Step("done", "done", lambda lane: Plan([], "== done: 0 of 1"), print),
        Step("b", "b", lambda lane: Plan([task(lane)], ""), print),
    ]
    seq = StageSequence(steps, timer=clock)
    assert seq.start() and drain(seq)[0][0] == 1
    seq.interrupted()
    assert clock.events == [("start", "done"), ("finished", "done"), ("start", "b"),
                            ("stopped", "b")]  # fmt: skip
    empty = StageSequence([steps[0]], timer=Clock())
    assert not empty.start() and empty.finished()


def test_a_trial_tune_ends_without_a_callback_is_passed_on_once():
    """Tune may end a trial without on_trial_complete/on_trial_error (a reused worker that
    could not be reset): found at the end of Tune's step, so its lane does not wait forever."""
    from types import SimpleNamespace

    from nas.pipeline.ray_layer import SequenceEnds

    plain = Task(spec="s.yaml", spec_abs="/s.yaml", output="/o", dataset="x", seed=0)
    seq = StageSequence([Step("a", "a", lambda lane: Plan([plain], ""), print)])
    seq.start()
    ((_, t),) = drain(seq)
    ends = SequenceEnds(seq)
    trial = SimpleNamespace(trial_id="t1", status="RUNNING", config={"step": 0,
                            "task": t.to_config()}, last_result={}, error_file=None)  # fmt: skip
    ends.on_step_end(1, [trial])
    assert not seq.finished()  # still running: nothing to pass on
    trial.status = "ERROR"
    ends.on_step_end(2, [trial])
    assert seq.finished()
    ends.on_trial_error(3, [trial], trial)  # a late callback: passed on once only
    with pytest.raises(NasError, match="x seed 0: its worker could not be reset for it"):
        seq.raise_errors()


def test_errors_of_ours_are_raised_together_and_a_bug_as_it_was(capsys):
    seq = StageSequence([])
    seq.errors += [NasError("a: failed"), KeyError("bug"), NasError("b: failed")]
    with pytest.raises(KeyError):
        seq.raise_errors()
    said = capsys.readouterr().out.splitlines()[-2:]
    assert said[0].endswith("nas: error: a: failed") and said[1].endswith("nas: error: b: failed")
    ours = StageSequence([], errors=[NasError("a: failed"), NasError("b: failed")])
    with pytest.raises(NasError, match=r"^a: failed\nb: failed$"):
        ours.raise_errors()
