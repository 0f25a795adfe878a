"""Orchestration of an experiment: pre-flight checks, provenance, data preparation, the
stages through Ray Tune, and the results table. Re-running the same command continues an
interrupted run: finished trials are skipped (their ``done.json``), unfinished ones resume from
their state."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from nas.core.errors import NasError
from nas.core.jsonio import read_json, write_json
from nas.data.formats import dataset_format, manifest_entry
from nas.data.mini_vtab import prepare
from nas.pipeline.console import say
from nas.pipeline.context import (
    dataset_root,
    tracker_for,
)
from nas.pipeline.hparams import Hparams
from nas.pipeline.layout import output_id, relocate_output, run_layout
from nas.pipeline.preflight import (
    check_class_names,
    check_cluster,
    check_inputs,
    check_job_paths,
    check_output,
    check_packaged_targets,
    check_private_cpus,
    check_resources,
    check_resume_state,
    probe_tracking,
)
from nas.pipeline.provenance import record_output
from nas.pipeline.ray_layer import ray_started, run_sequence, start_ray
from nas.pipeline.reports import collect_results, ui_links
from nas.pipeline.retrain import Retrain
from nas.pipeline.sequence import StageSequence, Step
from nas.pipeline.stage import Stage
from nas.pipeline.subnet_search import LOGGERS_LOCK, SupernetAndSearch
from nas.pipeline.verify import Verify
from nas.spec.experiment import ExperimentSpec, load_spec
from nas.tracking.candidates import wait_for_loggers
from nas.tracking.logged_model import register_winners
from nas.tracking.runs import Tracker


def run_experiment(
    spec_path: str | Path, *, output: str | Path | None = None, new: bool = False
) -> dict[str, Any]:
    if Path(spec_path).exists() and not Path(spec_path).is_file():
        raise NasError(
            f"{spec_path}: not a regular file (a pipe, such as <(...), or a device): the spec is "
            "read again by every trial and copied into the output folder; save it to a file"
        )
    spec = load_spec(spec_path, output=output)
    check_job_paths(spec)
    private = not (spec.ray_address or os.environ.get("RAY_ADDRESS"))
    if spec.gpus > 0 and private:  # a private Ray has this machine's GPUs: say so before it starts
        import torch

        if not torch.cuda.is_available():
            raise NasError(
                f"{spec_path}: resources.gpus is {spec.gpus:g} but this machine has "
                "no GPU; set resources.gpus: 0, or submit to a cluster with GPUs"
            )
    probe_tracking(spec)
    spec = check_output(spec, new)
    check_resume_state(spec)
    check_inputs(spec)
    started, tracker = False, None
    try:
        if private and not ray_started():
            check_private_cpus(spec)  # before anything is written
            # The run's own files (output folder, MLflow store, data) are made while the private
            # Ray starts (about 8 s on 2 cores, most of it waiting for its processes).
            with ThreadPoolExecutor(1, thread_name_prefix="nas-set-up") as pool:
                local = pool.submit(set_up, spec, cluster=False)
                started = start_ray(None)
            tracker = local.result()
            check_resources(spec, private=True)
        else:
            started = start_ray(spec.ray_address)  # the output folder is made once Ray answers
            check_resources(spec, private=started)
            tracker = set_up(spec, cluster=True)
        with stop_on_signals():  # after ray.init, which installs a SIGTERM handler that aborts
            run_stages(spec)
        if spec.mlflow_register:
            register(spec)
    except KeyboardInterrupt:
        if tracker is not None:  # else nothing was tracked yet
            stop_tracking(spec)
        raise
    finally:
        if started:
            import ray

            ray.shutdown()
    results = collect_results(spec)
    for line in ui_links(spec.tracking_uri, tracker.experiment_id, output_id(spec.output)):
        say(line)
    return results


def set_up(spec: ExperimentSpec, cluster: bool) -> Tracker:
    """The run's own files: the output folder claimed and recorded, what the cluster lacks
    said first (``cluster``: Ray is up), the MLflow store and experiment, the data prepared
    and checked. Returns the run's tracker."""
    # before provenance.json says it ran before
    for line in relocate_output(spec.output, own_store=spec.mlflow_uri is None):
        say(line)
    record_output(spec)
    if cluster:  # Before anything is written for the trials: what the cluster lacks is said first.
        check_cluster(spec)
    # Create the MLflow store's tables and the experiment here, once: trials that start
    # together would otherwise race to migrate a new sqlite database (and deadlock).
    tracker = tracker_for(spec)
    # MLflow 3.17's UI opens an experiment of unknown kind as a GenAI one (traces,
    # "Agent versions"); this one is model training (runs, models, their metrics).
    tracker.client.set_experiment_tag(
        tracker.experiment_id, "mlflow.experimentKind", "custom_model_development"
    )
    if spec.description:  # the experiment page's description
        tracker.client.set_experiment_tag(
            tracker.experiment_id, "mlflow.note.content", spec.description
        )
    data_hashes = prepare_data(spec)
    check_class_names(spec)
    check_packaged_targets(spec)
    prov = read_json(run_layout(spec).provenance)
    prov["data_sha256"] = data_hashes
    write_json(run_layout(spec).provenance, prov)
    return tracker


def register(spec: ExperimentSpec) -> None:
    """``mlflow.register``: each dataset's searched winners in the Model Registry."""

    rows = [read_json(p) for p in sorted((spec.output / "retrain").glob("*/*/done.json"))]
    for dataset, uri in register_winners(spec.tracking_uri, spec.mlflow_experiment, rows).items():
        say(f"== registered {dataset}: {uri}")


def stop_tracking(spec: ExperimentSpec, drain_s: float = 20.0) -> None:
    """A stopped run's MLflow runs: every open one marked KILLED at once (``ray job stop``
    allows the driver 3 seconds by default), then again once the trials have ended and their
    candidate loggers have logged what was scored (up to ``drain_s`` seconds), so that no
    run a trial or a logger opened meanwhile stays RUNNING."""
    import ray

    tracker = tracker_for(spec)
    tags = {"spec_hash": spec.hash(), "output_id": output_id(spec.output)}
    tracker.stop_running(tags)
    if ray.is_initialized():
        ray.shutdown()  # the trials end with the driver's connection
    locks = sorted((spec.output / "search").glob(f"*/{LOGGERS_LOCK}"))
    wait_for_loggers(locks, drain_s)
    tracker.stop_running(tags)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Ctrl-C, SIGTERM (`ray job stop`, a scheduler's pre-emption) and SIGINT all stop the
    run the same way: a KeyboardInterrupt in the driver, trials end with it, and the files
    the stages wrote are the state a rerun continues from. Tune's own SIGINT handler (which
    would end ``Tuner.fit`` as if the trials had finished) is switched off."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    # SIGINT too: a process started in the background of a shell inherits it ignored.
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def pipeline(spec: ExperimentSpec) -> list[tuple[str, Stage]]:
    """The spec's stages in order, each with the name its wall time is recorded under:
    hparams (when enabled) -> supernet and search -> (verify ->) the searched subnets' sweeps (with
    ``hparams.sweep_searched``) -> retrain; with ``stages.verify``, the search's best
    candidates and the anchors verified alone after the search."""
    stages: list[tuple[str, Stage]] = []
    if spec.hparams.enabled:
        stages.append(("hparams", Hparams()))
    if spec.search.enabled:
        stages.append(("supernet+search", SupernetAndSearch()))
    if spec.verify.enabled:
        stages.append(("verify", Verify()))
    if spec.hparams.enabled and spec.hparams.sweep_searched:
        stages.append(("hparams (searched)", Hparams(searched=True)))
    return [*stages, ("retrain", Retrain())]


def run_stages(spec: ExperimentSpec) -> None:
    """Each stage's unfinished trials in order (``pipeline``), all in one Ray Tune run."""
    base = {**spec_reference(spec), "output": str(spec.output)}
    pairs = [(ds, seed) for ds in spec.datasets for seed in spec.seeds]
    steps = [Step(name, stage.name, _planner(stage, spec, base, pairs), stage.run)
             for name, stage in pipeline(spec)]  # fmt: skip
    sequence = StageSequence(
        steps, lanes=[ds.key for ds in spec.datasets], timer=StageTimer(run_layout(spec).timings)
    )
    run_sequence(sequence, storage=run_layout(spec).ray, cpus=spec.cpus, gpus=spec.gpus)


def _planner(stage: Stage, spec: ExperimentSpec, base: dict[str, str], pairs: list) -> Any:
    """A stage's plan for one dataset (a lane of the sequence): its pairs alone."""
    return lambda key: stage.plan(spec, base, [(ds, seed) for ds, seed in pairs if ds.key == key])


class StageTimer:
    """Wall time of each stage, appended per invocation of ``nas run`` to ``timings.json``
    (a resumed run adds an entry; stages it skipped take a fraction of a second): from its
    plan to its last trial's end. A stage that ends is recorded as its seconds; one stopped
    or failed as ``{"seconds": s, "ended": "stopped" | "failed"}``, and said so on the
    console."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entry: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "stages": {}}
        try:
            self.history = json.loads(path.read_text()) if path.is_file() else []
        except ValueError:  # only timings: a damaged file is started afresh
            self.history = []
        self.history.append(self.entry)
        self.began: dict[str, float] = {}

    def start(self, stage: str) -> None:
        self.began[stage] = time.perf_counter()

    def stop(self, stage: str, ended: str) -> None:
        """A stage ended: ``finished``, ``stopped`` or ``failed``."""
        seconds = round(time.perf_counter() - self.began.pop(stage), 2)
        finished = ended == "finished"
        self.entry["stages"][stage] = seconds if finished else {"seconds": seconds, "ended": ended}
        write_json(self.path, self.history)
        say(f"== {stage}: {seconds:.1f} s" + ("" if finished else f" ({ended})"))


def spec_reference(spec: ExperimentSpec) -> dict[str, str]:
    """How trials find the spec: relative to the working directory when it lies inside it
    (under ``ray job submit`` every node has its own copy of that directory), else absolute."""
    if not spec.path:
        raise NasError("the pipeline needs a spec file")
    absolute = Path(spec.path).resolve()
    try:
        relative = str(absolute.relative_to(Path.cwd()))
    except ValueError:
        relative = None
    return {"spec": relative or str(absolute), "spec_abs": str(absolute)}


def prepare_data(spec: ExperimentSpec) -> dict[str, Any]:
    """The content hashes of the mini-VTAB tasks the spec uses. A task under a user's ``root``
    must have been written by ``nas data prepare`` (its manifest.json is read, nothing there is
    touched); without ``root`` the task is prepared once under the output folder."""

    hashes: dict[str, Any] = {}
    for ds in (d for d in spec.datasets if not dataset_format(d.format).needs_root):
        root = dataset_root(spec, ds)
        entry = manifest_entry(root, ds.name)
        if entry is None and ds.root is not None:
            raise NasError(
                f"{root / ds.name}: not a prepared mini-VTAB task; run `nas data prepare "
                f"mini-vtab --out {root} --tasks {ds.name}`, or leave out 'root' to have it "
                "prepared under the output folder"
            )
        if entry is None:
            say(f"preparing mini-VTAB task {ds.name} in {root}")
            staging = root / ".staging"
            manifest = prepare(staging / ds.name, (ds.name,), log=lambda *_: None)
            shutil.rmtree(root / ds.name, ignore_errors=True)  # left by an interrupted run
            (staging / ds.name / ds.name).rename(root / ds.name)
            shutil.rmtree(staging, ignore_errors=True)
            entry = manifest["tasks"][ds.name]
            write_json(root / ds.name / "manifest.json", entry)
        if ds.test_split not in entry["splits"]:  # prepared before the split existed
            raise NasError(
                f"{root / ds.name}: has no {ds.test_split} split (datasets' test_split of "
                f"{ds.key}); prepare the task again (`nas data prepare mini-vtab --out NEW_FOLDER "
                f"--tasks {ds.name}`): its other splits come out the same"
            )
        hashes[ds.key] = {split: v["sha256"] for split, v in entry["splits"].items()}
    return hashes
