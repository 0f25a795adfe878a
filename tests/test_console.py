"""The console of ``nas run``: progress through Tune's results and back, the view's text, the
plain timestamped lines, and the live view redrawn in place (rich, into a terminal stream)."""

from __future__ import annotations

import io
import re

import pytest

from nas.core.errors import NasError
from nas.pipeline.console import Console, ConsoleView, choose_mode, from_result, to_result
from nas.pipeline.progress import EpochProgress, SearchProgress, SweepProgress

EPOCH = EpochProgress(
    stage="supernet",
    dataset="digits",
    seed=1,
    eta_s=30.0,
    epoch=2,
    epochs=10,
    metrics={"train_loss": 1.25, "train_acc": 0.5, "lr": 0.01},
)
SWEEP = SweepProgress(
    stage="hparams",
    dataset="digits",
    seed=0,
    label="supernet",
    eta_s=12.0,
    epoch=3,
    epochs=10,
    metrics={"train_loss": 0.5, "train_acc": 0.8, "lr": 0.004},
    lr=0.005,
    weight_decay=1e-4,
    module_lr={"pgn": 4.0},
    val_acc=0.75,
)
SEARCH = SearchProgress(
    stage="search",
    dataset="mnist5k",
    seed=2,
    eta_s=None,
    round=3,
    evaluated=30,
    planned=50,
    best_val_acc=0.8125,
)


@pytest.mark.parametrize("progress", [EPOCH, SWEEP, SEARCH])
def test_progress_goes_through_a_tune_result_and_back(progress):
    result = to_result(progress)
    # Tune gets the numbers to plot, and the whole progress as one string
    assert {k: v for k, v in result.items() if k != "progress"} == progress.numbers()
    assert isinstance(result["progress"], str)
    assert from_result(result) == progress
    assert from_result({"finished": 1, "val_acc": 0.5}) is None  # a trial's last result


def test_view_renders_a_line_per_running_trial_and_the_stage_totals():
    view = ConsoleView("supernet", total=3)
    view.start("a", "supernet digits seed 1", now=100.0)
    view.update("a", EPOCH, now=101.0)
    view.start("b", "supernet mnist5k seed 0", now=102.0)
    assert view.render(now=111.0) == [
        # the time left counts down from the report's (30 s at 101 s)
        "[supernet digits seed 1] epoch 2/10: loss 1.2500, train acc 0.5000, ~20 s left",
        "[supernet mnist5k seed 0] starting (9 s)",
        # one waiting and nothing finished yet: no estimate for the whole stage
        "supernet: 3 trials, 0 done, 2 running, 1 waiting",
    ]
    view.end("a", now=121.0)  # took 21 s
    view.start("c", "supernet textures seed 0", now=121.0)
    view.end("b", now=122.0, failed=True)
    assert view.render(now=125.0) == [
        "[supernet textures seed 0] starting (4 s)",
        "supernet: 3 trials, 1 done, 1 running, 1 failed, 0 waiting",
    ]
    view.update("c", SEARCH, now=126.0)  # no eta of its own
    assert view.render(now=126.0)[0] == (
        "[search mnist5k seed 2] round 3: 30/50 candidates, best val acc 0.8125"
    )


def test_view_estimates_the_stage_from_running_and_finished_trials():
    view = ConsoleView("retrain", total=5)
    for name in "ab":
        view.start(name, name, now=0.0)
    view.update("a", EPOCH, now=10.0)  # 30 s left at 10 s
    view.end("b", now=40.0)  # 40 s a trial
    # at 20 s: "a" has 20 s left; 3 waiting on 1 busy worker at 40 s each
    assert view.seconds_left(now=20.0) == pytest.approx(20.0 + 3 * 40.0)
    assert view.render(now=20.0)[-1] == (
        "retrain: 5 trials, 1 done, 1 running, 3 waiting, ~140 s left"
    )


def test_plain_mode_prints_a_timestamped_line_per_event():
    out = io.StringIO()
    console = Console("hparams", total=2, mode="plain", stream=out)
    with console.showing():
        console.started("t1", "hparams digits seed 0 supernet")
        console.reported("t1", to_result(SWEEP))
        console.reported("t1", {"finished": 1})  # the final result: no line
        console.ended("t1")
    lines = out.getvalue().splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
    assert len(lines) == 2
    assert re.fullmatch(stamp + re.escape(SWEEP.line()), lines[0])
    assert re.fullmatch(
        stamp
        + re.escape("[hparams digits seed 0 supernet] done after ")
        + r"\d+ s; hparams: 2 trials, 1 done, 0 running, 1 waiting, ~\d+ s left",
        lines[1],
    )
    assert "\x1b[" not in out.getvalue()  # no terminal codes in a log file


def test_live_mode_redraws_in_place_and_leaves_the_screen_clean():
    out = io.StringIO()
    console = Console("supernet", total=2, mode="live", stream=out)
    with console.showing():
        console.started("a", "supernet digits seed 1")
        console.reported("a", to_result(EPOCH))
        print("a warning from somewhere")  # printed above the view, not through it
        console.ended("a")
    screen = out.getvalue()
    assert "[supernet digits seed 1] epoch 2/10: loss 1.2500" in screen
    assert "supernet: 2 trials, 1 done, 0 running, 1 waiting" in screen
    assert "a warning from somewhere" in screen
    assert "\x1b[2K" in screen and "\x1b[1A" in screen  # lines erased, cursor moved up
    # a timestamped line per event is the plain mode's, not the live view's
    assert not re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[", screen, re.M)


def test_stages_of_several_datasets_side_by_side():
    """Each dataset goes on to its next stage on its own: the screen shows every stage with
    trials running or waiting, and a trial counts in its own stage's totals."""
    out = io.StringIO()
    console = Console("", 0, mode="plain", stream=out)
    console.begin(0, "supernet+search", 1)  # digits' search
    console.begin(0, "supernet+search", 1)  # dsprites_loc's
    console.started("a", "digits seed 1", 0)
    console.started("b", "dsprites_loc seed 1", 0)
    console.ended("a")
    console.begin(1, "retrain", 1)  # digits goes on while dsprites_loc searches
    console.started("c", "digits seed 1 rank1", 1)
    console.reported("b", to_result(EPOCH))
    screen = console.renderable().plain.splitlines()
    assert screen[1:] == [
        EPOCH.line(),
        "supernet+search: 2 trials, 1 done, 1 running, 0 waiting, ~30 s left",
        "[digits seed 1 rank1] starting (0 s)",
        "retrain: 1 trials, 0 done, 1 running, 0 waiting",
    ]
    console.ended("b")
    assert (
        out.getvalue()
        .splitlines()[-1]
        .endswith("supernet+search: 2 trials, 2 done, 0 running, 0 waiting")
    )


def test_mode_follows_the_terminal_unless_asked(monkeypatch):
    monkeypatch.delenv("NAS_PROGRESS", raising=False)
    assert choose_mode(stream=io.StringIO()) == "plain"

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert choose_mode(stream=Tty()) == "live"
    monkeypatch.setenv("NAS_PROGRESS", "plain")
    assert choose_mode(stream=Tty()) == "plain"
    assert choose_mode("live", stream=io.StringIO()) == "live"
    monkeypatch.setenv("NAS_PROGRESS", "fancy")
    with pytest.raises(NasError, match=r"NAS_PROGRESS='fancy': expected one of auto, live, plain"):
        choose_mode()
