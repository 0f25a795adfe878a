"""The search stage: candidates scored with the supernet's inherited weights on the
validation split, every one appended to a log as scored and handed to MLflow loggers, so that a
stopped search continues where it stopped."""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from nas.core.errors import NasError
from nas.data.decode import DecodedSplit
from nas.families.prompted import PromptedModel
from nas.pipeline.console import say
from nas.pipeline.context import (
    base_tags,
    data_params,
    load_splits,
)
from nas.pipeline.layout import RunLayout, run_layout
from nas.pipeline.progress import Report, SearchProgress
from nas.pipeline.stage import Pairs, Stage
from nas.pipeline.supernet import dataset_tasks, run_supernet
from nas.pipeline.tasks import Task
from nas.pipeline.trial import Trial
from nas.search import Evaluated, SearchAlgorithm, algorithm_options, make_search
from nas.space.cost import added_flops, subnet_params
from nas.space.subnet import Subnet
from nas.spec.experiment import ExperimentSpec
from nas.tracking.candidates import CandidateLogger, logging_processes, subnet_params_flat
from nas.tracking.runs import Tracker
from nas.training.evaluate import evaluate_candidates
from nas.training.train import load_trainable

#: Held (shared) by a search's candidate loggers while they live: a stopped run waits on it.
LOGGERS_LOCK = ".loggers.lock"


def read_candidates_log(path: Path) -> list[Evaluated]:
    """The candidates a search scored before a stop. A last line cut by a kill is cut off the
    file too, so that what is appended next starts on a line of its own; a damaged line
    before the last is an error naming it."""
    if not path.is_file():
        return []
    out, good = [], 0
    data = path.read_bytes()
    lines = data.split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            out.append(Evaluated.from_data(json.loads(line)))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            if any(rest.strip() for rest in lines[number:]):
                raise NasError(
                    f"{path}:{number}: damaged candidate line (lines after it are intact); "
                    "remove that line to continue the search"
                ) from None
            break
        good += len(line) + 1
    good = min(good, len(data))
    if good < len(data) or (data and not data.endswith(b"\n")):
        with open(path, "r+b") as f:  # cut the partial last line (and end on a newline)
            f.truncate(good)
            if good and not data[:good].endswith(b"\n"):
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
    return out


def restored_search(spec: ExperimentSpec, seed: int, history: list[Evaluated]) -> SearchAlgorithm:
    """The spec's search algorithm, brought to where ``history`` (a stopped search's
    candidates) left it. A search begun before anchors and budget moves existed (issue 37)
    replays only without them: it continues that way, said on the console, so that no
    scored candidate is lost."""
    s = spec.search
    named = tuple(
        spec.retrain.subnet_baselines().values()
    )  # anchors, where the algorithm uses them

    def make(**extra: Any) -> SearchAlgorithm:
        options = {**s.options, **extra}
        return make_search(
            s.algorithm, spec.space, seed=seed, cost=s.cost, named_anchors=named, **options
        )

    algo = make()
    try:
        algo.restore(history)
    except ValueError:
        legacy = {"anchors": False, "moves": 0.0}
        if not set(legacy) <= set(algorithm_options(s.algorithm)) or set(legacy) & set(s.options):
            raise
        algo = make(**legacy)
        algo.restore(history)  # not that either: the error names the first mismatch
        say(
            f"search: {len(history)} candidates were scored before anchors and budget moves "
            "existed; this search continues without them"
        )
    return algo


def run_search(task: Task, report: Report = lambda p: None) -> dict[str, Any]:
    """Score candidates with the trained supernet's inherited weights on the validation
    split, continuing a stopped search from its candidates.jsonl."""
    trial = Trial.of(task, "search", Search.folder)
    if (done := trial.finished()) is not None:
        return done
    spec, ds, seed, out = trial.spec, trial.ds, trial.seed, trial.folder
    out.mkdir(parents=True, exist_ok=True)
    val = load_splits(spec, ds, ("val",))["val"]
    s = spec.search
    tags = base_tags(spec, "search", ds, seed)
    params = {"algorithm": s.algorithm, "cost": s.cost, **s.options}
    params |= {"eval_split": val.name, "eval_images": len(val), **data_params(val)}
    parent = trial.track(
        f"search {ds.key} seed {seed}",
        tags,
        params=params,
        description=f"{s.algorithm} search of {spec.space.name} on {ds.key} (seed {seed}): "
        f"candidates scored with the supernet's weights on {val.name}, cost {s.cost}",
        splits=(val,),
    )
    # The loggers start (import MLflow) while the model is built.
    logger = CandidateLogger(
        trial.tracker, parent, tags, logging_processes(spec.cpus), lock=out / LOGGERS_LOCK
    )
    weights = load_file(str(run_layout(spec).supernet(ds.key, seed) / "supernet.safetensors"))
    model = trial.model(val, seeded=False)
    load_trainable(model, weights)
    known = {e.subnet: e for e in read_candidates_log(out / "candidates.jsonl")}
    algo = restored_search(spec, seed, list(known.values()))

    def log_candidate(e: Evaluated) -> None:
        logger.log(
            e.subnet.key(),
            str(e.subnet),
            subnet_params_flat(e.subnet.to_data()),
            _candidate_metrics(spec, e),
            {"round": e.round},
        )

    for e in known.values():  # logged before a kill? CandidateLogger skips those already there
        log_candidate(e)
    evaluated_now = _score_all(trial, model, val, algo, known, log_candidate, parent, report)
    logger.close()
    title = f"{ds.key} seed {seed}"
    _log_artifacts(spec, trial.tracker, parent, out, algo.history, algo.best(1)[0].subnet, title)
    result = {
        "dataset": ds.key,
        "seed": seed,
        "evaluated": len(algo.history),
        "evaluated_this_run": evaluated_now,
        "top": chosen(trial.tracker, parent, algo.best(len(algo.history)), spec),
        "mlflow_run_id": parent,
    }
    return trial.finish(parent, result)


def _score_all(
    trial: Trial,
    model: PromptedModel,
    val: DecodedSplit,
    algo: SearchAlgorithm,
    known: dict[Subnet, Evaluated],
    log_candidate: Callable[[Evaluated], None],
    parent: str,
    report: Report,
) -> int:
    """The search to its end: each scored candidate appended to candidates.jsonl (synced: a
    kill loses none) and logged; each round's best and mean to MLflow and ``report``.
    Returns how many candidates this call scored."""
    mean, std = trial.spec.backbone.normalisation()
    evaluated_now = 0
    started = time.time()
    with open(trial.folder / "candidates.jsonl", "a") as log:

        def score(fresh: list[Subnet]) -> list[float]:
            batch = trial.spec.search.eval_batch_size
            return evaluate_candidates(model, fresh, val, mean=mean, std=std, batch_size=batch)

        def on_scored(e: Evaluated) -> None:
            nonlocal evaluated_now
            evaluated_now += 1
            log.write(json.dumps(e.to_data()) + "\n")
            log.flush()
            os.fsync(log.fileno())
            log_candidate(e)

        def on_round(batch: list[Subnet]) -> None:
            best = algo.best(1)[0]
            trial.tracker.log_metrics(
                parent,
                {
                    "best_val_acc": best.score,
                    "round_mean_val_acc": sum(known[c].score for c in batch) / len(batch),
                },
                step=algo.round,
            )
            left = max(algo.planned - len(algo.history), 0)
            report(
                SearchProgress(
                    "search",
                    trial.ds.key,
                    trial.seed,
                    eta_s=(time.time() - started) / max(evaluated_now, 1) * left,
                    round=algo.round,
                    evaluated=len(algo.history),
                    planned=algo.planned,
                    best_val_acc=best.score,
                )
            )

        algo.run(score, known, on_scored, on_round)
    return evaluated_now


def chosen(
    tracker: Tracker, parent: str, ranked: list[Evaluated], spec: ExperimentSpec
) -> list[dict[str, Any]]:
    """The candidates handed on (the first ``top_k`` of ``ranked``: retraining's, or the
    verification's with ``stages.verify``), each with its candidate run's ID; their runs
    tagged (``tag_chosen``)."""
    ranking = [e.to_data() | {"key": e.subnet.key(), "subnet_str": str(e.subnet)} for e in ranked]
    top_k = max(1, spec.retrain.top_k, spec.verify.top_k if spec.verify.enabled else 0)
    runs = tag_chosen(tracker, parent, ranking, top_k, spec.search.cost)
    return [entry | {"mlflow_run_id": runs.get(entry["key"])} for entry in ranking[:top_k]]


def tag_chosen(
    tracker: Tracker, parent: str, ranking: list[dict[str, Any]], top_k: int, cost: str
) -> dict[str, str]:
    """Tag the candidate runs the search hands to retraining, the first ``top_k`` of
    ``ranking`` (``nas.chosen``: rank1, rank2, ...), saying why the winner won where others
    tied with it on validation accuracy; every candidate's run ID by its key."""
    runs = {key: run_id for key, (run_id, _) in tracker.children(parent).items()}
    if not ranking:
        return runs
    best = ranking[0]["score"]
    tied = sum(1 for e in ranking if e["score"] == best)
    for rank, entry in enumerate(ranking[:top_k], 1):
        run_id = runs.get(entry["key"])
        if run_id is None:  # its logger failed; the failure was reported
            continue
        tags = {"nas.chosen": f"rank{rank}"}
        if rank == 1 and tied > 1:
            tags["nas.chosen_why"] = (
                f"tied at val_acc {best:.4f} with {tied - 1} other candidate(s); ranked "
                f"first for the lowest {cost} among them (then the earliest evaluated)"
            )
        for key, value in tags.items():
            tracker.client.set_tag(run_id, key, value)
    return runs


def _log_artifacts(
    spec: ExperimentSpec,
    tracker: Tracker,
    parent: str,
    out: Path,
    history: list[Evaluated],
    best: Subnet,
    title: str,
) -> None:
    """The finished search's table of candidates and its plots, written and logged."""
    from nas.tracking.plots import plot_search  # matplotlib (heavy): once, at the end

    s = spec.search
    _write_table(out / "candidates.csv", history, spec)
    tracker.log_artifact(parent, out / "candidates.csv")
    cost_label = "trainable parameters" if s.cost == "params" else "added FLOPs"
    for png in plot_search(
        history, spec.space, best, out / "plots", f"{title} ({s.algorithm})", cost_label
    ):
        tracker.log_artifact(parent, png, "plots")


def run_supernet_and_search(task: Task, report: Report = lambda p: None) -> dict[str, Any]:
    """The supernet, then its search: the pipeline runs both in one trial per dataset and
    seed. Each part resumes on its own (a finished supernet is not retrained)."""
    run_supernet(task, report)
    return run_search(task, report)


class Search(Stage):
    """The search alone, of a supernet already trained."""

    name = "search"

    def tasks(self, spec: ExperimentSpec, base: dict[str, str], pairs: Pairs) -> list[Task]:
        return dataset_tasks(base, pairs)

    @staticmethod
    def folder(layout: RunLayout, task: Task) -> Path:
        return layout.search(task.dataset, task.seed)

    run = staticmethod(run_search)


class SupernetAndSearch(Search):
    """One trial per dataset and seed trains the supernet, then searches it: a trial's start
    (a worker importing torch, building the model) is paid once, not twice."""

    name = "supernet+search"
    title = "supernet and search"
    run = staticmethod(run_supernet_and_search)


def _candidate_metrics(spec: ExperimentSpec, e: Evaluated) -> dict[str, float]:
    g = spec.space.geometry
    return {
        "val_acc": e.score,
        "params": subnet_params(e.subnet, g),
        "added_flops": added_flops(e.subnet, g),
        "round": e.round,
    }


def _write_table(path: Path, history: list[Evaluated], spec: ExperimentSpec) -> None:
    g = spec.space.geometry
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["round", "subnet", "val_acc", "params", "added_flops"])
        for e in history:
            w.writerow(
                [
                    e.round,
                    str(e.subnet),
                    f"{e.score:.4f}",
                    subnet_params(e.subnet, g),
                    added_flops(e.subnet, g),
                ]
            )
