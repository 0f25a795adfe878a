"""Checks made before anything starts (and before Ray, where they can be): the tracking
server, the output folder, what a rerun continues from, the inputs, and what the cluster has. A
problem is one error naming the file or key and the fix."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from urllib.parse import urlparse

from nas.core.errors import NasError
from nas.core.jsonio import read_json
from nas.data.decode import decode_image
from nas.data.formats import dataset_format
from nas.data.lists import CLASSNAMES_FILE, read_class_names
from nas.families.vit.spec import portable
from nas.pipeline.context import (
    dataset_root,
    read_splits,
    target_splits,
)
from nas.pipeline.layout import run_layout
from nas.pipeline.provenance import spec_diff
from nas.pipeline.subnet_search import read_candidates_log
from nas.spec.experiment import ExperimentSpec


def probe_tracking(spec: ExperimentSpec) -> None:
    """A tracking server must answer before anything starts: MLflow's client would retry for
    minutes inside every trial."""
    from nas.tracking.runs import probe_server  # MLflow (heavy): only with a tracking server

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
            read_json(path)
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
        read_candidates_log(path)
    store = out / "mlflow.db"
    if spec.mlflow_uri is None and store.is_file():
        try:
            # Read-write: a writer killed mid-transaction leaves a hot journal, which SQLite
            # rolls back on the next open (as MLflow's own would); read-only, it cannot.
            with contextlib.closing(sqlite3.connect(store)) as db:
                db.execute("SELECT count(*) FROM experiments").fetchone()
        except sqlite3.Error as exc:
            raise NasError(
                f"{store}: the run's MLflow store is damaged ({exc}); restore it, or move it "
                "away (the rerun starts a new store; the results on disk are kept)"
            ) from None


#: Images decoded per split by the pre-flight check (first, last and a spread between).
SAMPLED_IMAGES = 16


def decode_sample(split, g) -> None:
    """Decode ``SAMPLED_IMAGES`` of a split's images (first, last and a spread between) at
    the backbone's input: a missing or corrupt one is a DataError naming its list line."""

    n = len(split.entries)
    picks = {round(i * (n - 1) / max(SAMPLED_IMAGES - 1, 1)) for i in range(SAMPLED_IMAGES)}
    for i in sorted(picks) if n else []:
        decode_image(split.entries[i], (g.image_size, g.image_size), g.in_chans)


def check_inputs(spec: ExperimentSpec) -> None:
    """Before Ray starts: every dataset's lists read (labels, duplicates, missing images,
    splits), a sample of each split's images decoded, and the backbone's weights loaded. What
    fails here would otherwise fail inside every trial, after retries. `nas data check`
    decodes every image."""
    g = spec.backbone.geometry()
    for ds in spec.datasets:
        packaged = not dataset_format(ds.format).needs_root
        if packaged and not (dataset_root(spec, ds) / ds.name).is_dir():
            continue  # prepared by this run, from packaged data
        splits = read_splits(spec, ds)
        if ds.targets:  # read in the source's label space: a label out of range stops here
            targets = target_splits(spec, ds, splits["test"])
            check_targets(ds.key, splits, targets)
            splits |= targets
        for split in splits.values():
            decode_sample(split, g)
    spec.backbone.check_weights()  # reads and fits the weights file: one clear error if not


def check_packaged_targets(spec: ExperimentSpec) -> None:
    """After a run prepared its packaged datasets (``check_inputs`` skipped them): their
    targets' lists read in the source's label space and a sample of each decoded, before any
    trial starts."""
    g = spec.backbone.geometry()
    for ds in spec.datasets:
        if not ds.targets or dataset_format(ds.format).needs_root:
            continue
        splits = read_splits(spec, ds)
        targets = target_splits(spec, ds, splits["test"])
        check_targets(ds.key, splits, targets)
        for split in targets.values():
            decode_sample(split, g)


#: The splits a model is trained or chosen on: a target may share no image with them.
TRAINED_ON = ("train", "val", "trainval")


def check_targets(dataset: str, splits: dict, targets: dict) -> None:
    """Domain-generalisation targets must be held out: one listing an image the model is
    trained or chosen on is a leak (one error naming the first); one of a single class is
    valid but scores nothing but that class (said as a warning)."""
    seen: dict[Path, tuple[str, str]] = {}
    for name in TRAINED_ON:
        for e in splits[name].entries if name in splits else ():
            seen.setdefault(e.path.resolve(), (name, e.source))
    for tname, target in targets.items():
        shared = [(e, seen[e.path.resolve()]) for e in target.entries if e.path.resolve() in seen]
        if shared:
            entry, (split, where) = shared[0]
            raise NasError(
                f"{entry.source}: target {tname!r} of dataset {dataset} lists {len(shared)} "
                f"image(s) of its {split} split (first {entry.path}, also {where}): a target is "
                "tested once as unseen data, so it may share no image with what the model "
                "trains or is chosen on"
            )
        classes = {e.label for e in target.entries}
        if len(classes) == 1:
            print(
                f"warning: target {tname!r} of dataset {dataset} ({target.source}) holds a "
                f"single class ({classes.pop()}): its accuracy says only how often that class "
                "is predicted",
                flush=True,
            )


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
STAGE_ORDER = ("hparams", "supernet", "search", "verify", "retrain")


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
    # the searched subnets' own sweeps (under hparams/) sweep what verification chose
    verify = STAGE_ORDER.index("verify")
    if first == verify and any((output / "hparams").glob("*/searched-*/done.json")):
        return None
    return STAGE_ORDER[first]


def job_working_dir(cwd: Path | None = None) -> Path | None:
    """The copy of the submitter's working directory that ``ray job submit`` runs a job in
    (``<Ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>``), when this
    process runs in one; else None."""
    cwd = (cwd or Path.cwd()).resolve()
    for folder in (cwd, *cwd.parents):
        if folder.name.startswith("_ray_pkg_") and folder.parent.name == "working_dir_files":
            return folder
    return None


def check_job_paths(spec: ExperimentSpec) -> None:
    """Under ``ray job submit``, nothing may be written into the job's copy of the working
    directory: Ray deletes it, its name changes with every edit of the checkout (so a rerun
    would not find the run to continue), and the submitter never sees it."""
    copy = job_working_dir()
    if copy is None:
        return
    written = {"output": spec.output}
    uri, artifacts = spec.mlflow_uri or "", spec.mlflow_artifacts or ""
    if uri.startswith("sqlite:///"):  # sqlite:///relative.db, sqlite:////absolute.db
        written["mlflow.tracking_uri"] = Path(uri.removeprefix("sqlite:///"))
    elif uri.startswith("file:") or (uri and "://" not in uri):
        written["mlflow.tracking_uri"] = Path(urlparse(uri).path)
    if artifacts.startswith("file:") or (artifacts and "://" not in artifacts):
        written["mlflow.artifact_location"] = Path(urlparse(artifacts).path)
    for key, path in written.items():
        if path.resolve().is_relative_to(copy):
            shown = str(path) if path.is_absolute() else f"{path} (= {path.resolve()})"
            example = "--output /shared/runs/NAME" if key == "output" else f"{key}: /shared/..."
            raise NasError(
                f"{spec.path}: {key} {shown} lies in the copy of the working directory that "
                f"`ray job submit` made for this job ({copy}), which Ray deletes and renames "
                f"with every change to the checkout: give an absolute path outside it (e.g. "
                f"{example}), on storage every node of the cluster shares"
            )


def check_output(spec: ExperimentSpec, new: bool) -> ExperimentSpec:
    """Refuse to continue a different spec in an existing output folder (or move to a new
    folder when asked), and refuse a folder that cannot be made; nothing is written."""
    from dataclasses import replace

    prov_path = run_layout(spec).provenance
    if prov_path.is_file():
        old = read_json(prov_path)
        if old.get("spec_hash") not in (spec.hash(), spec.legacy_hash()):
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
                changed = spec_diff(portable(old.get("spec", {})), portable(spec.to_data()))
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


def check_resources(spec: ExperimentSpec, private: bool = False) -> None:
    """A trial's CPUs and GPUs must fit on some node: refused on a private Ray (no node will
    ever be added), a warning on a cluster (an autoscaler may add one)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cores = max((n.get("Resources", {}).get("CPU", 0) for n in nodes), default=0)
    if spec.cpus > cores:
        text = _cpus_text(spec, cores)
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


def _cpus_text(spec: ExperimentSpec, cores: float) -> str:
    return (
        f"{spec.path}: resources.cpus is {spec.cpus:g} per trial but no node of the Ray "
        f"cluster has that many CPUs (the most on one node: {cores:g})"
    )


def check_private_cpus(spec: ExperimentSpec) -> None:
    """Before a private Ray starts (and anything is written): a trial's CPUs must fit on this
    machine, as Ray will count them (its affinity and cgroup limits)."""
    # Ray's own count of this machine's CPUs (no public API gives it before ray.init).
    from ray._private.utils import get_num_cpus

    cores = get_num_cpus()
    if spec.cpus > cores:
        raise NasError(f"{_cpus_text(spec, cores)}; set resources.cpus to at most {cores:g}")


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


def check_class_names(spec: ExperimentSpec) -> None:
    """A CLIP classifies by name: refuse, before any trial starts, a dataset without them."""
    if not spec.backbone.classifies_by_name:
        return

    for ds in spec.datasets:
        if dataset_format(ds.format).class_names_from_folders:
            continue
        folder = dataset_root(spec, ds) / ds.name
        if read_class_names(folder) is None:
            raise NasError(
                f"dataset {ds.key!r} has no class names ({folder / CLASSNAMES_FILE} is "
                "missing), and the CLIP backbone classifies by name: add that file, one name "
                "per line in label order"
            )
