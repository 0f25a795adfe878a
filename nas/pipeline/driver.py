"""Orchestration of an experiment: provenance, data preparation, the three stages through
Ray Tune, and the results table. Re-running the same command continues an interrupted run:
finished trials are skipped (their ``done.json``), unfinished ones resume from their state."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from nas.clip.model import ClipSpec
from nas.data.hashing import file_sha256
from nas.errors import NasError
from nas.pipeline import stages
from nas.pipeline.ray_layer import GroupedASHA, run_stage, start_ray
from nas.spec import DatasetSpec, ExperimentSpec, load_spec
from nas.subnet import Subnet

PACKAGES = (
    "torch",
    "timm",
    "ray",
    "optuna",
    "mlflow",
    "numpy",
    "safetensors",
    "open-clip-torch",
    "nas-prompt",
)


def code_version() -> str:
    here = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if out.returncode == 0:
            return out.stdout.strip()
    except OSError:
        pass
    return "unknown"


def provenance(spec: ExperimentSpec) -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    weights, text_weights = spec.backbone.weights, None
    if isinstance(spec.backbone, ClipSpec):  # a timm image tower's file, the text tower's file
        text_weights = weights
        tower = spec.backbone.image_tower
        weights = tower.weights if tower is not None else spec.backbone.pretrained
    local = weights if weights and Path(weights).is_file() else None
    return {
        "spec_hash": spec.hash(),
        "spec": spec.to_data(),
        "code_version": code_version(),
        "python": platform.python_version(),
        "packages": versions,
        "backbone_weights_sha256": file_sha256(local) if local else None,
        "clip_text_weights_sha256": file_sha256(text_weights) if text_weights else None,
        "seeds": list(spec.seeds),
    }


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if old == new else [prefix]


def probe_tracking(spec: ExperimentSpec) -> None:
    """A tracking server must answer before anything starts: MLflow's client would retry for
    minutes inside every trial."""
    from nas.tracking import probe_server

    problem = probe_server(spec.tracking_uri)
    if problem:
        raise NasError(
            f"{spec.path}: mlflow.tracking_uri {spec.tracking_uri}: {problem}; start it "
            "(mlflow server --host ... --port ...) or fix the URI"
        )


def check_resume_state(spec: ExperimentSpec) -> None:
    """What a rerun continues from, read before Ray starts: every done.json and the
    provenance parse, every resume checkpoint is a whole file, the candidates logs read (a
    line cut by a kill is cut off), the default MLflow store is an sqlite database. A damaged
    file is one error naming it and the fix, instead of a crash in every trial."""
    import sqlite3
    import zipfile

    out = spec.output
    if not out.is_dir():
        return
    parts = ("hparams", "supernet", "search", "retrain")
    for path in [
        out / "provenance.json",
        *(p for d in parts for p in (out / d).glob("**/done.json")),
    ]:
        if path.is_file():
            stages.read_json(path)
    for path in (p for d in parts for p in (out / d).glob("**/state.pt")):
        try:
            with zipfile.ZipFile(path) as z:  # torch.save's format; a cut file has no index
                z.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise NasError(
                f"{path}: damaged resume state ({exc}); remove it to restart that training "
                "from its first epoch"
            ) from None
    for path in (out / "search").glob("*/candidates.jsonl"):
        stages.read_candidates_log(path)
    store = out / "mlflow.db"
    if spec.mlflow_uri is None and store.is_file():
        try:
            with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
                db.execute("SELECT count(*) FROM experiments").fetchone()
        except sqlite3.Error as exc:
            raise NasError(
                f"{store}: the run's MLflow store is damaged ({exc}); restore it, or move it "
                "away (the rerun starts a new store; the results on disk are kept)"
            ) from None


#: Images decoded per split by the pre-flight check (first, last and a spread between).
SAMPLED_IMAGES = 16


def check_inputs(spec: ExperimentSpec) -> None:
    """Before Ray starts: every dataset's lists read (labels, duplicates, missing images,
    splits), a sample of each split's images decoded, and the backbone's weights loaded. What
    fails here would otherwise fail inside every trial, after retries. `nas data check`
    decodes every image."""
    from nas.data.decode import decode_image

    g = spec.backbone.geometry()
    size = g.patch_size * round(g.num_patches**0.5)
    for ds in spec.datasets:
        if ds.format == "mini-vtab" and not (stages.dataset_root(spec, ds) / ds.name).is_dir():
            continue  # prepared by this run, from packaged data
        splits = stages.read_splits(spec, ds)
        for split in splits.values():
            n = len(split.entries)
            picks = sorted(
                {round(i * (n - 1) / max(SAMPLED_IMAGES - 1, 1)) for i in range(SAMPLED_IMAGES)}
            )
            for i in picks if n else []:
                decode_image(split.entries[i], (size, size), g.in_chans)
    if not isinstance(spec.backbone, ClipSpec) and spec.backbone.weights not in (None, "hub"):
        spec.backbone.create(2)  # reads and fits the weights file: one clear error if not


def check_writable(folder: Path) -> None:
    """The output folder can be made and written, said before anything is created."""
    if folder.exists() and not folder.is_dir():
        raise NasError(f"output {folder} is a file, not a folder; give a folder path")
    first = next(p for p in (folder, *folder.parents) if p.exists())
    if not first.is_dir():
        raise NasError(f"output {folder}: {first} is a file, so no folder can be made below it")
    if not os.access(first, os.W_OK | os.X_OK):
        raise NasError(f"output {folder}: {first} is not writable by this user")


#: The stages in the order they run, as named in a spec's ``stages``.
STAGE_ORDER = ("hparams", "supernet", "search", "retrain")
#: Settings that belong to a later stage than their key says: the searched subnets' own
#: sweeps run after the search, and only the retraining uses them.
STAGE_OF_KEY = {"hparams.sweep_searched": "retrain"}
#: What a stage leaves once one of its steps has started.
STARTED = ("done.json", "state.pt", "candidates.jsonl")


def unstarted_stage(output: Path, changed: list[str]) -> str | None:
    """The earliest stage whose settings changed, when only stage settings changed and no
    step of that stage or a later one has started: continuing then keeps the finished work
    of the stages before it (a fixed retraining setting needs no new supernet). None when
    the change reaches what finished work depends on."""
    stages_changed = {STAGE_OF_KEY.get(key, key.split(".", 1)[0]) for key in changed}
    if not changed or not stages_changed <= set(STAGE_ORDER):
        return None
    first = min(STAGE_ORDER.index(s) for s in stages_changed)
    for stage in STAGE_ORDER[first:]:
        if any(p for name in STARTED for p in (output / stage).glob(f"**/{name}")):
            return None
    return STAGE_ORDER[first]


def check_output(spec: ExperimentSpec, new: bool) -> ExperimentSpec:
    """Refuse to continue a different spec in an existing output folder (or move to a new
    folder when asked), and refuse a folder that cannot be made; nothing is written."""
    from dataclasses import replace

    prov_path = spec.output / "provenance.json"
    if prov_path.is_file():
        old = stages.read_json(prov_path)
        if old.get("spec_hash") != spec.hash():
            if new:
                # Named by the spec's hash, so that the same command run again (--new
                # included) finds and continues this run instead of starting a third.
                beside = spec.output.with_name(f"{spec.output.name}-{spec.hash()[:8]}")
                print(
                    f"{spec.output} holds a run of a different spec; this run goes to {beside} "
                    "(the same command continues it)",
                    flush=True,
                )
                return check_output(replace(spec, output=beside), new=False)
            else:
                changed = _diff(old.get("spec", {}), spec.to_data())
                stage = unstarted_stage(spec.output, changed)
                if stage is not None:
                    print(
                        f"{spec.output}: continuing with changed {stage} settings "
                        f"({', '.join(changed[:8])}); no step from the {stage} stage on had "
                        "started, so what finished before it is kept",
                        flush=True,
                    )
                    check_writable(spec.output)
                    return spec
                raise NasError(
                    f"{spec.output} holds a run of a different spec (changed: "
                    f"{', '.join(changed[:8]) or 'unknown'}); give another output folder, "
                    "or --new to start a new run beside it"
                )
    check_writable(spec.output)
    return spec


def record_output(spec: ExperimentSpec) -> None:
    """Create the output folder and record the spec and its provenance (each session added)."""
    prov_path = spec.output / "provenance.json"
    try:
        spec.output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NasError(f"output {spec.output}: cannot create it ({exc.strerror})") from None
    record = provenance(spec)
    session = {k: record[k] for k in ("code_version", "python", "packages")}
    session["started"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if prov_path.is_file():  # a resumed run: the first record stays, each session is added
        old = stages.read_json(prov_path)
        sessions = old.get("sessions") or [{k: old.get(k) for k in session if k != "started"}]
        if sessions[-1].get("code_version") != session["code_version"]:
            print(
                f"warning: {spec.output} was run by code {sessions[-1].get('code_version')} and "
                f"continues with {session['code_version']}; both are recorded in provenance.json",
                flush=True,
            )
        if old.get("spec_hash") != record["spec_hash"]:  # continued with changed later stages
            session["spec_hash"] = record["spec_hash"]
            session["changed"] = _diff(old.get("spec", {}), record.get("spec", {}))
        record = {
            **old,
            "spec": record.get("spec"),
            "spec_hash": record["spec_hash"],
            "sessions": [*sessions, session],
        }
    else:
        record["sessions"] = [session]
    stages.write_json(prov_path, record)
    if spec.path:
        (spec.output / "spec.yaml").write_text(Path(spec.path).read_text())


def prepare_data(spec: ExperimentSpec) -> dict[str, Any]:
    """The content hashes of the mini-VTAB tasks the spec uses. A task under a user's ``root``
    must have been written by ``nas data prepare`` (its manifest.json is read, nothing there is
    touched); without ``root`` the task is prepared once under the output folder."""
    from nas.data.mini_vtab import prepare

    hashes: dict[str, Any] = {}
    for ds in (d for d in spec.datasets if d.format == "mini-vtab"):
        root = stages.dataset_root(spec, ds)
        entry = stages.mini_vtab_entry(spec, ds)
        if entry is None and ds.root is not None:
            raise NasError(
                f"{root / ds.name}: not a prepared mini-VTAB task; run `nas data prepare "
                f"mini-vtab --out {root} --tasks {ds.name}`, or leave out 'root' to have it "
                "prepared under the output folder"
            )
        if entry is None:
            print(f"preparing mini-VTAB task {ds.name} in {root}", flush=True)
            staging = root / ".staging"
            manifest = prepare(staging / ds.name, (ds.name,), log=lambda *_: None)
            shutil.rmtree(root / ds.name, ignore_errors=True)  # left by an interrupted run
            (staging / ds.name / ds.name).rename(root / ds.name)
            shutil.rmtree(staging, ignore_errors=True)
            entry = manifest["tasks"][ds.name]
            stages.write_json(root / ds.name / "manifest.json", entry)
        hashes[ds.key] = {split: v["sha256"] for split, v in entry["splits"].items()}
    return hashes


def check_class_names(spec: ExperimentSpec) -> None:
    """A CLIP classifies by name: refuse, before any trial starts, a dataset without them."""
    if not isinstance(spec.backbone, ClipSpec):
        return
    from nas.data.formats import CLASSNAMES_FILE, read_class_names

    for ds in spec.datasets:
        if ds.format == "imagefolder":  # its class folders' names are the class names
            continue
        folder = stages.dataset_root(spec, ds) / ds.name
        if read_class_names(folder) is None:
            raise NasError(
                f"dataset {ds.key!r} has no class names ({folder / CLASSNAMES_FILE} is "
                "missing), and the CLIP backbone classifies by name: add that file, one name "
                "per line in label order"
            )


def run_experiment(
    spec_path: str | Path, *, output: str | Path | None = None, new: bool = False
) -> dict[str, Any]:
    spec = load_spec(spec_path, output=output)
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
    started = start_ray(spec.ray_address)  # the output folder is made once Ray answers
    try:
        check_resources(spec, private=started)
        record_output(spec)
        # Before anything is written for the trials: what the cluster lacks is said first.
        check_cluster(spec)
        # Create the MLflow store's tables and the experiment here, once: trials that start
        # together would otherwise race to migrate a new sqlite database (and deadlock).
        stages.tracker_for(spec)
        data_hashes = prepare_data(spec)
        check_class_names(spec)
        prov = stages.read_json(spec.output / "provenance.json")
        prov["data_sha256"] = data_hashes
        stages.write_json(spec.output / "provenance.json", prov)
        with stop_on_signals():  # after ray.init, which installs a SIGTERM handler that aborts
            run_stages(spec)
    except KeyboardInterrupt:
        stop_tracking(spec)
        raise
    finally:
        if started:
            import ray

            ray.shutdown()
    return collect_results(spec)


def stop_tracking(spec: ExperimentSpec, drain_s: float = 20.0) -> None:
    """A stopped run's MLflow runs: every open one marked KILLED at once (``ray job stop``
    allows the driver 3 seconds by default), then again once the trials have ended and their
    candidate loggers have logged what was scored (up to ``drain_s`` seconds), so that no
    run a trial or a logger opened meanwhile stays RUNNING."""
    import ray

    from nas.tracking import wait_for_loggers

    tracker = stages.tracker_for(spec)
    tags = {"spec_hash": spec.hash()}
    tracker.stop_running(tags)
    if ray.is_initialized():
        ray.shutdown()  # the trials end with the driver's connection
    locks = sorted((spec.output / "search").glob(f"*/{stages.LOGGERS_LOCK}"))
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


def run_stages(spec: ExperimentSpec) -> None:
    """hparams (when enabled) -> supernet -> search -> retrain, each stage's unfinished
    trials through Ray Tune."""
    base = {**spec_reference(spec), "output": str(spec.output)}
    timings = StageTimer(spec.output / "timings.json")
    pairs = [(ds, seed) for ds in spec.datasets for seed in spec.seeds]
    storage = spec.output / "ray"
    if spec.hparams.enabled:
        with timings("hparams"):
            run_hparams_stage(spec, base, storage, hparams_sweeps(spec))
    if spec.search.enabled:
        # One trial per dataset and seed trains the supernet, then searches it: a trial's
        # start (a worker importing torch, building the model) is paid once, not twice.
        todo = [
            {**base, "dataset": ds.key, "seed": seed}
            for ds, seed in pairs
            if not (stages.search_dir(spec, ds.key, seed) / "done.json").is_file()
        ]
        print(f"== supernet and search: {len(todo)} of {len(pairs)} trials to run", flush=True)
        with timings("supernet+search"):
            run_stage("supernet+search", todo, storage=storage, cpus=spec.cpus, gpus=spec.gpus)
    if spec.hparams.enabled and spec.hparams.sweep_searched:
        with timings("hparams (searched)"):
            sweeps = searched_sweeps(spec, pairs)
            run_hparams_stage(spec, base, storage, sweeps, title="hparams (searched subnets)")
    tasks = retrain_tasks(spec, base, pairs)
    todo = [
        t
        for t in tasks
        if not (
            stages.retrain_dir(spec, t["dataset"], t["seed"], t["label"]) / "done.json"
        ).is_file()
    ]
    print(f"== retrain: {len(todo)} of {len(tasks)} trials to run", flush=True)
    with timings("retrain"):
        run_stage("retrain", todo, storage=storage, cpus=spec.cpus, gpus=spec.gpus)


class StageTimer:
    """Wall time of each stage, appended per invocation of ``nas run`` to ``timings.json``
    (a resumed run adds an entry; stages it skipped take a fraction of a second)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entry: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "stages": {}}
        try:
            self.history = json.loads(path.read_text()) if path.is_file() else []
        except ValueError:  # only timings: a damaged file is started afresh
            self.history = []
        self.history.append(self.entry)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self.entry["stages"][stage] = round(seconds, 2)
            stages.write_json(self.path, self.history)
            print(f"== {stage}: {seconds:.1f} s", flush=True)


def spec_reference(spec: ExperimentSpec) -> dict[str, str | None]:
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


def check_resources(spec: ExperimentSpec, private: bool = False) -> None:
    """A trial's CPUs and GPUs must fit on some node: refused on a private Ray (no node will
    ever be added), a warning on a cluster (an autoscaler may add one)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cores = max((n.get("Resources", {}).get("CPU", 0) for n in nodes), default=0)
    if spec.cpus > cores:
        text = (
            f"{spec.path}: resources.cpus is {spec.cpus:g} per trial but no node of the Ray "
            f"cluster has that many CPUs (the most on one node: {cores:g})"
        )
        if private:  # nothing will ever add a node: trials would wait forever
            raise NasError(f"{text}; set resources.cpus to at most {cores:g}")
        print(
            f"warning: {text}; trials wait until an autoscaler adds such a node. Stop with "
            f"Ctrl-C and set resources.cpus to at most {cores:g} if it has none to add.",
            flush=True,
        )
    most = max((n.get("Resources", {}).get("GPU", 0) for n in nodes), default=0)
    if spec.gpus > most:
        # Not refused: an autoscaling cluster adds GPU nodes when trials ask for them.
        print(
            f"warning: {spec.path}: resources.gpus is {spec.gpus:g} but no node of the Ray "
            f"cluster has that many GPUs now (the most on one node: {most:g}); trials wait "
            "until an autoscaler adds such a node. Stop with Ctrl-C and set resources.gpus "
            f"to at most {most:g} if the cluster has none to add.",
            flush=True,
        )


def check_cluster(spec: ExperimentSpec) -> None:
    """On a cluster of several nodes, every node must reach the MLflow store and see the
    output folder; refuse a node-local sqlite store or output path with the fix."""
    import uuid

    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    uri = spec.tracking_uri
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        raise NasError(
            f"{spec.path}: the cluster has {len(nodes)} nodes but mlflow.tracking_uri is "
            f"{uri!r}, a store on one node's disk; start a tracking server every node reaches "
            "(mlflow server --backend-store-uri ... --host <head ip>) and set "
            "mlflow.tracking_uri: http://<head ip>:5000 (or a database URI)"
        )
    marker = spec.output / f".shared-check-{uuid.uuid4().hex}"
    marker.write_text("visible")
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        @ray.remote(num_cpus=0)
        def sees(path: str) -> bool:
            return Path(path).is_file()

        checks = {
            n["NodeManagerAddress"] + " " + n["NodeID"][:8]: sees.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(marker))
            for n in nodes
        }
        blind = [name for name, ref in checks.items() if not ray.get(ref, timeout=120)]
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise NasError(
            f"{spec.path}: the output folder {spec.output} is not visible from node(s) "
            f"{', '.join(blind)}; on a cluster of several nodes set output to a path on storage "
            "every node shares (an NFS mount at the same path on every node)"
        )


@dataclass(frozen=True)
class Sweep:
    """One learning-rate sweep of the hparams stage: a method on a dataset, trained with one
    seed; its winner is written to hparams/<dataset>/<method>/done.json."""

    ds: DatasetSpec
    method: str  # "supernet", "baseline-NAME" or stages.searched_method(...)
    seed: int
    subnet: dict[str, Any] | None = None  # a searched subnet's (a baseline's is in the spec)

    @property
    def group(self) -> str:
        return f"{self.ds.key}/{self.method}"

    @property
    def multipliers(self) -> bool:
        """Whether stages.hparams.module_lrs joins the grid: for the supernet and the searched
        subnets (a baseline is one module; it takes stages.retrain.module_lr)."""
        return not self.method.startswith("baseline-")


def hparams_sweeps(spec: ExperimentSpec) -> list[Sweep]:
    """Stage 0's sweeps: the supernet's (when the search runs) and each baseline's, per
    dataset, trained with the first seed; the winner serves every seed."""
    methods = ["supernet"] if spec.search.enabled else []
    zero_shot = isinstance(spec.backbone, ClipSpec)  # an empty subnet on CLIP trains nothing
    methods += [
        f"baseline-{name}"
        for name, subnet in spec.retrain.baselines.items()
        if not (zero_shot and not subnet)
    ]
    return [Sweep(ds, method, spec.seeds[0]) for ds in spec.datasets for method in methods]


def searched_sweeps(spec: ExperimentSpec, pairs) -> list[Sweep]:
    """With ``stages.hparams.sweep_searched``: one sweep per searched subnet that will be
    retrained (each dataset, seed and rank up to ``retrain.top_k``), with that seed."""
    out = []
    for ds, seed in pairs:
        found = stages.read_json(stages.search_dir(spec, ds.key, seed) / "done.json")
        for rank, cand in enumerate(found["top"][: spec.retrain.top_k], 1):
            method = stages.searched_method(f"rank{rank}", seed)
            out.append(Sweep(ds, method, seed, cand["subnet"]))
    return out


def run_hparams_stage(
    spec: ExperimentSpec,
    base: dict[str, Any],
    storage: Path,
    sweeps: list[Sweep],
    title: str = "hparams",
) -> None:
    """The lr x wd grid of every sweep, all in one Tune run so that the cluster stays busy;
    ASHA stops points early, comparing each only with its own sweep (``GroupedASHA``). A
    sweep's winner is written to hparams/<ds>/<method>/done.json and tracked in MLflow as soon
    as its last point ends, so an interrupted stage keeps every finished sweep; the later
    stages read the winners."""
    from ray.tune import Callback

    h = spec.hparams
    todo = {
        s.group: s
        for s in sweeps
        if not (stages.hparams_dir(spec, s.ds.key, s.method) / "done.json").is_file()
    }

    def multipliers(sweep: Sweep) -> list[dict[str, float]]:
        return h.module_lr_grid() if sweep.multipliers else [{}]

    grid = [
        {
            **base,
            "dataset": s.ds.key,
            "seed": s.seed,
            "method": s.method,
            "lr": lr,
            "weight_decay": wd,
            **({"module_lr": scales} if scales else {}),
            **({"subnet": s.subnet} if s.subnet is not None else {}),
            "group": s.group,
        }
        for s in todo.values()
        for lr in h.lrs
        for wd in h.weight_decays
        for scales in multipliers(s)
    ]
    size = {s.group: len(h.lrs) * len(h.weight_decays) * len(multipliers(s)) for s in sweeps}
    print(
        f"== {title}: {len(todo)} of {len(sweeps)} sweeps to run, "
        f"{', '.join(str(n) for n in sorted(set(size.values())))} points each",
        flush=True,
    )
    ended: dict[str, list[dict[str, Any]]] = {}
    tracker = stages.tracker_for(spec)

    def tags(sweep: Sweep) -> dict[str, str]:
        return {**stages.base_tags(spec, "hparams", sweep.ds, sweep.seed), "label": sweep.method}

    def track(sweep: Sweep) -> None:
        """The sweep's MLflow run from its done.json (again, after a stop part-way through)."""
        ds, method = sweep.ds, sweep.method
        out = stages.hparams_dir(spec, ds.key, method)
        best = stages.read_json(out / "done.json")
        params: dict[str, Any] = {
            "lrs": list(h.lrs),
            "weight_decays": list(h.weight_decays),
            "epochs": h.epochs,
            "train_split": "train",
            "train_images": len(stages.read_splits(spec, ds)["train"].entries),
            "eval_split": "val",
            "chosen_lr": best["lr"],
            "chosen_weight_decay": best["weight_decay"],
            **{f"module_lrs.{k}": list(v) for k, v in h.module_lrs.items() if sweep.multipliers},
            **{f"chosen_module_lr.{k}": v for k, v in best.get("module_lr", {}).items()},
        }
        if sweep.subnet is not None:
            params["subnet"] = str(Subnet.from_data(sweep.subnet))
        run_id = tracker.run(f"hparams {ds.key} {method}", tags(sweep), params=params)
        tracker.log_metrics(run_id, {"best_val_acc": best["val_acc"]})
        tracker.log_artifact(run_id, out / "done.json")
        tracker.finish(run_id)

    def finish(sweep: Sweep, points: list[dict[str, Any]]) -> None:
        best = max(points, key=lambda p: (p["val_acc"], p["epochs"]))
        out = stages.hparams_dir(spec, sweep.ds.key, sweep.method)
        record = {**best, "seed": sweep.seed, "grid": points}
        if sweep.subnet is not None:
            record["subnet"] = sweep.subnet
        stages.write_json(out / "done.json", record)
        track(sweep)
        note = grid_edge_note(best["lr"], h.lrs)
        if note:
            print(f"hparams {sweep.ds.key} {sweep.method}: {note}", flush=True)

    # A sweep finished before a stop may have lost its MLflow run (stopped between writing
    # done.json and logging): log it again from its done.json.
    for sweep in sweeps:
        if sweep.group in todo:
            continue
        run_id = tracker.find_run(tags(sweep))
        if run_id is None or tracker.client.get_run(run_id).info.status != "FINISHED":
            track(sweep)

    class SweepEnd(Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            task, result = trial.config["task"], trial.last_result or {}
            points = ended.setdefault(task["group"], [])
            points.append(
                {
                    "lr": task["lr"],
                    "weight_decay": task["weight_decay"],
                    **({"module_lr": task["module_lr"]} if "module_lr" in task else {}),
                    "val_acc": result.get("val_acc", 0.0),
                    "epochs": result.get("training_iteration", 0),
                }
            )
            if len(points) == size[task["group"]]:
                points.sort(
                    key=lambda p: (
                        p["lr"],
                        p["weight_decay"],
                        sorted(p.get("module_lr", {}).items()),
                    )
                )
                finish(todo[task["group"]], points)

    run_stage(
        "hparams",
        grid,
        storage=storage,
        cpus=spec.cpus,
        gpus=spec.gpus,
        scheduler=GroupedASHA(
            "group",
            metric="val_acc",
            mode="max",
            max_t=h.epochs,
            grace_period=min(h.grace_period, h.epochs),
            reduction_factor=h.reduction_factor,
        ),
        callbacks=[SweepEnd()],
    )


def grid_edge_note(chosen: float, grid: Sequence[float]) -> str | None:
    """A warning when the sweep's winner is the grid's largest or smallest learning rate: the
    best one may lie outside the grid. (A winner at the largest rate of a sweep shorter than
    the final training can also be one that diverges over the longer schedule.)"""
    if len(grid) < 2 or min(grid) < chosen < max(grid):
        return None
    edge = "largest" if chosen == max(grid) else "smallest"
    return (
        f"the best learning rate, {chosen:g}, is the {edge} of the grid "
        f"{[float(f'{v:g}') for v in sorted(grid)]}; the best may lie beyond it (widen "
        "stages.hparams.lrs)"
    )


def retrain_tasks(spec: ExperimentSpec, base: dict[str, Any], pairs) -> list[dict[str, Any]]:
    tasks = []
    for ds, seed in pairs:
        found = {"top": []}
        if spec.search.enabled:
            found = stages.read_json(stages.search_dir(spec, ds.key, seed) / "done.json")
        for rank, cand in enumerate(found["top"][: spec.retrain.top_k], 1):
            tasks.append(
                {
                    **base,
                    "dataset": ds.key,
                    "seed": seed,
                    "label": f"rank{rank}",
                    "role": "searched" if rank == 1 else "searched (not reported)",
                    "subnet": cand["subnet"],
                    "val_acc": cand["score"],
                }
            )
        for name, subnet in spec.retrain.baselines.items():
            tasks.append(
                {
                    **base,
                    "dataset": ds.key,
                    "seed": seed,
                    "label": f"baseline-{name}",
                    "role": "baseline",
                    "subnet": subnet.to_data(),
                    "full_finetune": name in spec.retrain.full_finetune,
                    "val_acc": None,
                }
            )
    return tasks


def collect_results(spec: ExperimentSpec) -> dict[str, Any]:
    """The results table of a run's output folder (see ``summarise``)."""
    rows = [stages.read_json(p) for p in sorted((spec.output / "retrain").glob("*/*/done.json"))]
    results = {"spec_hash": spec.hash(), **summarise(rows)}
    stages.write_json(spec.output / "results.json", results)
    (spec.output / "results.md").write_text(results_markdown(results))
    return results


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per dataset the subnet ranked first by validation (retrained, tested once; mean over
    seeds); other retrained subnets stay in ``rows``, labelled. VTAB-style group means of the
    datasets whose group is known, their mean, and the flat mean over datasets."""
    reported: dict[str, list[float]] = {}
    group_of: dict[str, str] = {}
    for r in rows:
        if r["role"] == "searched":
            reported.setdefault(r["dataset"], []).append(r["test_acc"])
            if r.get("group"):
                group_of[r["dataset"]] = r["group"]
    per_dataset = {k: sum(v) / len(v) for k, v in reported.items()}
    groups: dict[str, list[float]] = {}
    for ds, acc in per_dataset.items():
        if ds in group_of:
            groups.setdefault(group_of[ds], []).append(acc)
    group_means = {g: sum(v) / len(v) for g, v in groups.items()}
    return {
        "rows": rows,
        "per_dataset": per_dataset,
        "group_means": group_means,
        "mean_of_groups": sum(group_means.values()) / len(group_means) if group_means else None,
        "flat_mean": sum(per_dataset.values()) / len(per_dataset) if per_dataset else None,
    }


def results_from_mlflow(uri: str, experiment: str | None = None) -> dict[str, Any]:
    """The results table rebuilt from an MLflow store alone (its finished retrain runs)."""
    from nas.tracking import Tracker  # sets MLflow's telemetry off before MLflow is used

    client = Tracker.client_for(uri)
    try:
        exps = [e for e in client.search_experiments() if e.name != "Default"]
    except Exception as exc:  # a database of another application, a server of another kind
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise NasError(
            f"{uri}: not an MLflow tracking store ({type(exc).__name__}: {first})"
        ) from None
    if experiment is not None:
        exps = [e for e in exps if e.name == experiment]
    if len(exps) != 1:
        names = ", ".join(e.name for e in client.search_experiments() if e.name != "Default")
        if experiment is not None:
            raise NasError(f"{uri}: no experiment named {experiment!r} (found: {names or 'none'})")
        raise NasError(f"{uri}: name the experiment with --experiment (found: {names or 'none'})")
    runs = client.search_runs(
        [exps[0].experiment_id],
        "tags.`nas.stage` = 'retrain' and attributes.status = 'FINISHED'",
        max_results=5000,
    )
    rows = []
    for run in runs:
        t, m, p = run.data.tags, run.data.metrics, run.data.params
        rows.append(
            {
                "dataset": t.get("nas.dataset"),
                "seed": int(t.get("nas.seed", 0)),
                "label": t.get("nas.label"),
                "role": p.get("role"),
                "group": t.get("nas.group"),
                "subnet_str": p.get("subnet"),
                "val_acc": m.get("val_acc"),
                "test_acc": m.get("test_acc"),
                "params": int(m.get("params", 0)),
                "added_flops": int(m.get("added_flops", 0)),
                "train_split": p.get("train_split"),
                "train_images": int(p["train_images"]) if "train_images" in p else None,
            }
        )
    return summarise(rows)


def results_markdown(results: dict[str, Any]) -> str:
    lines = [
        "| dataset | seed | subnet | role | trained on | val acc | test acc | params "
        "| added FLOPs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results["rows"], key=lambda r: (r["dataset"], r["seed"], r["label"])):
        val = f"{r['val_acc']:.4f}" if r.get("val_acc") is not None else "—"
        # rows of runs made before the split was recorded carry neither field
        fit = f"{r['train_split']} ({r['train_images']:,})" if r.get("train_images") else "—"
        lines.append(
            f"| {r['dataset']} | {r['seed']} | {r['subnet_str']} | {r['role']} | {fit} | {val} "
            f"| {r['test_acc']:.4f} | {r['params']:,} | {r['added_flops']:,} |"
        )
    lines.append("")
    lines.append(
        "Reported per dataset: the subnet ranked first by validation accuracy, retrained on "
        "the split named under 'trained on' (VTAB-1k and ImageFolder: train+val; few-shot: "
        "the K shots alone) and tested once (mean over seeds)."
    )
    lines.append("")
    for ds, acc in sorted(results["per_dataset"].items()):
        lines.append(f"- {ds}: {acc:.4f}")
    for g, acc in sorted(results["group_means"].items()):
        lines.append(f"- group {g}: {acc:.4f}")
    if results["mean_of_groups"] is not None:
        lines.append(f"- mean of group means: {results['mean_of_groups']:.4f}")
        lines.append(f"- flat mean over datasets: {results['flat_mean']:.4f}")
    return "\n".join(lines) + "\n"


def method_of(row: dict[str, Any]) -> str | None:
    """The method a retrained row stands for: the search's reported subnet ("searched") or a
    baseline by name; other retrained candidates stand for none (they are never reported)."""
    if row["role"] == "searched":
        return "searched"
    if row["role"] == "baseline":
        return str(row["label"]).removeprefix("baseline-")
    return None


def methods_markdown(results: dict[str, Any]) -> str:
    """Methods side by side: per dataset the test accuracy's mean ± standard deviation over
    seeds, then VTAB-style group means, their mean and the flat mean, and each method's
    trainable parameters (modules, head excluded) and added FLOPs, averaged over datasets."""
    import statistics

    cells: dict[tuple[str, str], list[float]] = {}
    cost: dict[str, list[tuple[int, int]]] = {}
    groups: dict[str, str] = {}
    for r in results["rows"]:
        method = method_of(r)
        if method is None:
            continue
        cells.setdefault((r["dataset"], method), []).append(r["test_acc"])
        cost.setdefault(method, []).append((r["params"], r["added_flops"]))
        if r.get("group"):
            groups[r["dataset"]] = r["group"]
    methods = sorted(cost, key=lambda m: (m != "searched", m))
    datasets = sorted({d for d, _ in cells}, key=lambda d: (groups.get(d, "~"), d))

    def fmt(values: list[float]) -> str:
        if not values:
            return "—"
        mean = 100 * statistics.mean(values)
        if len(values) == 1:
            return f"{mean:.1f}"
        return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"

    lines = [
        "| dataset | group | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for d in datasets:
        row = [fmt(cells.get((d, m), [])) for m in methods]
        lines.append(f"| {d} | {groups.get(d, '')} | " + " | ".join(row) + " |")

    def per_dataset(m: str) -> dict[str, float]:
        return {d: statistics.mean(v) for (d, mm), v in cells.items() if mm == m}

    summary: dict[str, list[str]] = {}
    for m in methods:
        accs = per_dataset(m)
        by_group: dict[str, list[float]] = {}
        for d, acc in accs.items():
            if d in groups:
                by_group.setdefault(groups[d], []).append(acc)
        means = {g: statistics.mean(v) for g, v in by_group.items()}
        for g in sorted({*groups.values()}):
            summary.setdefault(f"group {g}", []).append(
                f"{100 * means[g]:.1f}" if g in means else "—"
            )
        summary.setdefault("mean of group means", []).append(
            f"{100 * statistics.mean(means.values()):.1f}" if means else "—"
        )
        summary.setdefault("flat mean", []).append(f"{100 * statistics.mean(accs.values()):.1f}")
        params = statistics.mean(p for p, _ in cost[m])
        flops = statistics.mean(f for _, f in cost[m])
        summary.setdefault("trainable params (mean)", []).append(f"{params:,.0f}")
        summary.setdefault("added MFLOPs (mean)", []).append(f"{flops / 1e6:,.2f}")
    for name, values in summary.items():
        lines.append(f"| **{name}** | | " + " | ".join(values) + " |")
    lines += [
        "",
        "Test accuracy (%), mean ± standard deviation over seeds; 'searched' is the subnet the "
        "search ranked first by validation accuracy, retrained and tested once. Trainable "
        "parameters count the modules (full fine-tuning: the backbone), not the head.",
    ]
    return "\n".join(lines) + "\n"
