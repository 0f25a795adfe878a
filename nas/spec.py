"""Experiment specs: one YAML file says what to search, on which data, with which stages.

```yaml
name: quickstart
datasets:                          # one or many
  - {name: digits, format: mini-vtab}                 # prepared under <output>/data/mini-vtab
  - {name: dtd, format: vtab, root: /data/vtab-1k}
  - {name: oxford-pets, format: few-shot, root: /data/few-shot, shots: 16, split_seed: 0}
backbone: vit_fmnist               # a shipped backbone, a backbone.yaml, or {model, weights, ...}
space: tiny_cpu                    # a shipped space name or a YAML path (relative to this file)
budget: {params: {max: 40000}}     # optional: replaces the space's budget
seeds: [0]                         # supernet/search/retrain seeds
output: runs/quickstart            # results, checkpoints, Ray storage; relative to the cwd
mlflow: {tracking_uri: null, experiment: quickstart}   # default: sqlite in the output folder
resources: {cpus: 1, gpus: 0}      # per trial; fractional GPUs allowed
ray: {address: null}               # null: a private local Ray; "auto": the running cluster
stages:
  hparams: {enabled: false, lrs: [1.0e-4, 1.0e-3], weight_decays: [1.0e-4], epochs: 20}
  supernet: {epochs: 10, batch_size: 64, lr: 5.0e-4, checkpoint_every: 2, ...}
  search: {algorithm: evolution, cost: params, options: {generations: 3, population: 20}}
                                   # search: {enabled: false} retrains only the baselines
  retrain: {top_k: 1, epochs: 10, lr: 1.0e-3, baselines: {lora8: {lora: {depth: 6, dims: 8}}}}
```
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from nas.backbone import BackboneSpec
from nas.clip.model import ClipSpec
from nas.errors import ConfigError
from nas.search import ALGORITHMS, option_problem
from nas.space import (
    Bounds,
    Budget,
    SearchSpace,
    _check_budget_reachable,
    _parse_bounds,
    load_space,
    parse_backbone_value,
)
from nas.subnet import Subnet
from nas.validate import Reader
from nas.yamlio import Document, load_yaml, to_plain
from trainers.train import TrainConfig

FORMATS = ("mini-vtab", "vtab", "few-shot", "imagefolder")
# Baselines that are not subnets: the head alone on the frozen backbone (the same as an empty
# subnet), and full fine-tuning (every backbone weight trains, with the head).
LINEAR_PROBE, FULL_FINETUNE = "linear-probe", "full-finetune"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    format: str
    root: str | None = None  # the folder holding <name>/ (mini-vtab: default under output)
    shots: int | None = None  # few-shot only
    split_seed: int | None = None  # few-shot only: which seed's split
    duplicates: str = "error"

    @property
    def key(self) -> str:
        """A name unique within a spec (few-shot datasets carry their shots and split)."""
        if self.format == "few-shot":
            return f"{self.name}-{self.shots}shot-s{self.split_seed}"
        return self.name

    @property
    def retrain_split(self) -> str:
        """The split a winner (and every baseline) is retrained on before its one test.

        VTAB-1k retrains on train800val200, as VPT and NOAH do; a few-shot protocol (NOAH,
        CoOp) retrains on the K shots alone, its val list serving the search only; an
        ImageFolder retrains on train and val, as VTAB does."""
        return "train" if self.format == "few-shot" else "trainval"

    def to_data(self) -> dict[str, Any]:
        data = asdict(self)
        if self.retrain_split != "trainval":  # kept out otherwise: earlier hashes stay valid
            data["retrain_split"] = self.retrain_split
        return data


@dataclass(frozen=True)
class HparamsStage:
    """Stage 0 (optional): a learning-rate x weight-decay sweep per dataset and method (the
    supernet, and each baseline) on train/val only, early-stopped with ASHA."""

    enabled: bool = False
    lrs: tuple[float, ...] = (1e-4, 5e-4, 1e-3, 5e-3)
    weight_decays: tuple[float, ...] = (1e-4, 1e-2)
    epochs: int = 20
    batch_size: int = 64
    grace_period: int = 2  # ASHA: epochs every trial gets before it can be stopped
    reduction_factor: int = 3  # ASHA: keep the best 1/reduction_factor at each rung
    eval_subnets: int = 4  # the supernet is scored by the mean over this many fixed subnets
    # Per-module learning-rate multipliers swept for the supernet (and the searched subnets'
    # retraining), e.g. {pgn: [1, 4]}: every combination joins the lr x wd grid.
    module_lrs: dict[str, tuple[float, ...]] = field(default_factory=dict)
    # After the search, each searched subnet gets a sweep of its own retraining rates (the same
    # grid, as a baseline does) instead of retraining at the supernet's swept rates.
    sweep_searched: bool = False

    def module_lr_grid(self) -> list[dict[str, float]]:
        """Every combination of the swept multipliers ([{}] when none is swept)."""
        kinds = sorted(self.module_lrs)
        return [
            dict(zip(kinds, combo, strict=True))
            for combo in itertools.product(*(self.module_lrs[k] for k in kinds))
        ]


@dataclass(frozen=True)
class TrainingStage:
    """What a training stage sets; NOAH's defaults for the supernet, overridden per stage."""

    epochs: int = 500
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup_epochs: int = 10
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    label_smoothing: float = 0.0
    crop_pad: int = 0
    hflip: bool = False
    # Multipliers of lr and weight decay per module kind ("head": the classifier; "backbone":
    # full fine-tuning), e.g. {pgn: 4.0}: PGN's generator wants a larger rate than VPT.
    module_lr: dict[str, float] = field(default_factory=dict)
    module_weight_decay: dict[str, float] = field(default_factory=dict)

    def train_config(
        self,
        *,
        lr: float,
        weight_decay: float,
        seed: int,
        module_lr: dict[str, float] | None = None,
    ) -> TrainConfig:
        """The training loop's settings, with the (possibly tuned) lr and weight decay; tuned
        module multipliers replace the stage's own for the kinds they name."""
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=lr,
            weight_decay=weight_decay,
            warmup_epochs=self.warmup_epochs,
            warmup_lr=self.warmup_lr,
            min_lr=self.min_lr,
            label_smoothing=self.label_smoothing,
            crop_pad=self.crop_pad,
            hflip=self.hflip,
            seed=seed,
            module_lr={**self.module_lr, **(module_lr or {})},
            module_weight_decay=dict(self.module_weight_decay),
        )


@dataclass(frozen=True)
class SupernetStage(TrainingStage):
    checkpoint_every: int = 10
    # How subnets are drawn (nas.sampling; README, "Choosing how the supernet trains"):
    sampling: str = "uniform"  # NOAH's per-layer draws, or "balanced" over subnet sizes
    in_budget: bool = False  # redraw subnets outside the budget
    subnets_per_step: int = 1  # random subnets per mini-batch, gradients averaged
    sandwich: bool = False  # the largest and smallest subnets also train every step
    distill: float = 0.0  # weight of the KL to the largest subnet's detached predictions


#: ``in_budget`` redraws until a subnet fits: it needs this share of draws to fit (2,000 tried
#: at load), so that a draw never runs out of its 10,000 attempts in a long run.
MIN_ACCEPTANCE = 0.01

#: Settings added after specs were first hashed: left out of the hash at their defaults, so that
#: an existing run folder keeps its hash (and resumes) after an upgrade.
LATER_FIELDS = {
    "module_lr": {},
    "module_weight_decay": {},
    "module_lrs": {},
    "sampling": "uniform",
    "in_budget": False,
    "subnets_per_step": 1,
    "sandwich": False,
    "distill": 0.0,
    "sweep_searched": False,
}


def _hashed(stage: Any) -> dict[str, Any]:
    return {k: v for k, v in asdict(stage).items() if LATER_FIELDS.get(k, ...) != v}


@dataclass(frozen=True)
class SearchStage:
    enabled: bool = True  # false: no supernet and no search; only the baselines are retrained
    algorithm: str = "evolution"
    cost: str = "params"
    options: dict[str, Any] = field(default_factory=dict)
    eval_batch_size: int = 256


@dataclass(frozen=True)
class RetrainStage(TrainingStage):
    epochs: int = 100
    lr: float = 1e-3
    top_k: int = 1
    baselines: dict[str, Subnet] = field(default_factory=dict)
    # Baselines that train the whole backbone too (full fine-tuning; their subnet is empty).
    full_finetune: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    path: str | None
    datasets: tuple[DatasetSpec, ...]
    backbone: BackboneSpec | ClipSpec
    space: SearchSpace
    seeds: tuple[int, ...]
    output: Path
    mlflow_uri: str | None
    mlflow_experiment: str
    cpus: float
    gpus: float
    ray_address: str | None
    hparams: HparamsStage
    supernet: SupernetStage
    search: SearchStage
    retrain: RetrainStage

    mlflow_artifacts: str | None = None  # where a new experiment's artifacts go

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_uri or f"sqlite:///{self.output / 'mlflow.db'}"

    @property
    def artifact_location(self) -> str | None:
        """Where a new MLflow experiment stores artifacts: the spec's ``mlflow.artifact_location``;
        with a tracking server, the server's own default (its artifact proxy, so the UI shows
        them wherever it runs); with a local store, ``<output>/mlartifacts``."""
        if self.mlflow_artifacts:
            return self.mlflow_artifacts
        if self.tracking_uri.split(":", 1)[0] in ("http", "https", "databricks"):
            return None
        return (self.output / "mlartifacts").as_uri()

    def to_data(self) -> dict[str, Any]:
        """Everything that determines the results (not where they go), as plain data."""
        return to_plain(
            {
                "name": self.name,
                "datasets": [d.to_data() for d in self.datasets],
                "backbone": self.backbone.to_dict(),
                "space": self.space.to_data(),
                "seeds": list(self.seeds),
                # the sweep's winners set the later stages' learning rates; left out when off,
                # so that a spec without a sweep keeps the hash it always had
                **({"hparams": _hashed(self.hparams)} if self.hparams.enabled else {}),
                "supernet": _hashed(self.supernet),
                "search": asdict(self.search),
                "retrain": {
                    **{
                        k: v
                        for k, v in _hashed(replace(self.retrain, baselines={})).items()
                        if k != "full_finetune"
                    },
                    "baselines": {
                        k: FULL_FINETUNE if k in self.retrain.full_finetune else v.to_data()
                        for k, v in self.retrain.baselines.items()
                    },
                },
            }
        )

    def hash(self) -> str:
        blob = json.dumps(self.to_data(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _stage(
    reader: Reader,
    value: Any,
    key: str,
    cls,
    extra: dict | None = None,
    internal: tuple[str, ...] = (),
):
    """A stage's settings; ``extra`` keys are parsed by the caller, ``internal`` fields are
    not written in YAML at all."""
    defaults = cls()
    names = [f for f in asdict(defaults) if f not in (extra or {}) and f not in internal]
    data = reader.mapping(value or {}, key, optional=names + list(extra or {}))
    out = {}
    for name in names:
        if name not in data:
            continue
        default = getattr(defaults, name)
        k = f"{key}.{name}"
        if isinstance(default, bool):
            if not isinstance(data[name], bool):
                reader.fail(k, f"expected true or false, got {data[name]!r}")
            out[name] = data[name]
        elif isinstance(default, int):
            out[name] = reader.integer(data[name], k, minimum=0)
        elif isinstance(default, float):
            out[name] = reader.number(data[name], k, minimum=0)
        elif isinstance(default, str):
            out[name] = reader.string(data[name], k)
        elif isinstance(default, dict):
            out[name] = reader.mapping(data[name], k, open_keys=True)
        elif isinstance(default, tuple):
            values = data[name] if isinstance(data[name], list) else [data[name]]
            if not values:
                reader.fail(k, "expected a non-empty list of numbers")
            out[name] = tuple(
                reader.number(v, f"{k}[{i}]", minimum=0) for i, v in enumerate(values)
            )
    return cls(**out), data


def parse_spec(
    doc: Document, *, output: str | Path | None = None, check_data: bool = True
) -> ExperimentSpec:
    """Validate a spec. ``check_data=False`` skips checking that dataset folders exist (to
    validate a spec written for another machine)."""
    r = Reader(doc)
    base = Path(doc.file).parent if doc.file else Path.cwd()
    data = r.mapping(
        doc.data,
        "",
        required=["datasets", "space"],
        optional=[
            "name",
            "description",
            "backbone",
            "budget",
            "seeds",
            "output",
            "mlflow",
            "resources",
            "ray",
            "stages",
        ],
    )
    default_name = Path(doc.file).stem if doc.file else "experiment"
    name = r.string(data["name"], "name") if "name" in data else default_name

    # -- search space, backbone, budget
    space_ref = r.string(data["space"], "space")
    space_path = Path(space_ref)
    if space_path.suffix and not space_path.is_absolute():
        space_path = base / space_path
    try:
        space = load_space(space_path if space_path.suffix else space_ref)
    except ConfigError as exc:
        r.fail("space", f"{space_ref!r}: {exc}")
    if "backbone" in data:
        backbone = parse_backbone_value(data["backbone"], r, base)
        try:
            geometry = backbone.geometry()
        except ConfigError as exc:
            r.fail("backbone", exc.message)
        if geometry != space.geometry:
            r.fail(
                "backbone",
                f"its geometry (width {geometry.width}, {geometry.depth} blocks, "
                f"{geometry.seq_len} tokens) does not match the one space {space.name!r} "
                f"assumes (width {space.geometry.width}, {space.geometry.depth} blocks, "
                f"{space.geometry.seq_len} tokens)",
            )
    else:
        backbone = space.backbone
    if data.get("budget") is not None:
        b = r.mapping(data["budget"], "budget", optional=["params", "flops"])
        budget = Budget(
            params=_parse_bounds(r, b["params"], "budget.params") if "params" in b else Bounds(),
            flops=_parse_bounds(r, b["flops"], "budget.flops") if "flops" in b else Bounds(),
        )
        space = replace(space, budget=budget)
        _check_budget_reachable(space, r)  # the same check as a space file's budget

    # -- datasets
    if not isinstance(data["datasets"], list) or not data["datasets"]:
        r.fail("datasets", "expected a non-empty list of datasets")
    datasets = []
    for i, item in enumerate(data["datasets"]):
        k = f"datasets[{i}]"
        d = r.mapping(
            item,
            k,
            required=["name", "format"],
            optional=["root", "shots", "split_seed", "duplicates"],
        )
        fmt = r.string(d["format"], f"{k}.format", choices=FORMATS)
        ds_name = r.string(d["name"], f"{k}.name")
        root = None
        if "root" in d:
            root_path = Path(r.string(d["root"], f"{k}.root")).expanduser()
            root = str(root_path if root_path.is_absolute() else (base / root_path).resolve())
        elif fmt != "mini-vtab":
            r.fail(k, f"missing required key 'root' (the folder holding the {fmt} dataset)")
        duplicates = r.string(
            d.get("duplicates", "error"), f"{k}.duplicates", choices=["error", "drop"]
        )
        # A few-shot entry may list several shots and split seeds: one dataset per pair.
        variants: list[tuple[int | None, int | None]] = [(None, None)]
        if fmt == "few-shot":
            shots = r.int_choices(d.get("shots", 16), f"{k}.shots", minimum=1)
            splits = r.int_choices(d.get("split_seed", 0), f"{k}.split_seed", minimum=0)
            variants = [(n, s) for n in shots for s in splits]
        if fmt == "mini-vtab":
            from nas.data.mini_vtab import TASKS

            if ds_name not in TASKS:
                r.fail(
                    f"{k}.name",
                    f"{ds_name!r} is not a mini-VTAB task; known: {', '.join(TASKS)}",
                )
        elif check_data and not (Path(root) / ds_name).is_dir():
            r.fail(f"{k}.root", f"dataset folder not found: {Path(root) / ds_name}")
        elif check_data:
            _check_layout(r, k, fmt, Path(root) / ds_name, variants)
        for shots_k, split_seed in variants:
            ds = DatasetSpec(
                name=ds_name,
                format=fmt,
                root=root,
                shots=shots_k,
                split_seed=split_seed,
                duplicates=duplicates,
            )
            if any(o.key == ds.key for o in datasets):
                r.fail(f"{k}.name", f"dataset {ds.key!r} is listed twice")
            datasets.append(ds)

    seeds = r.int_choices(data.get("seeds", [0]), "seeds", minimum=0)
    if output is not None:
        out_text = str(output)
    elif "output" in data:
        if data["output"] is None:
            r.fail(
                "output",
                f"expected a folder path, got nothing (null); leave the key out for runs/{name}",
            )
        out_text = r.string(data["output"], "output")
    else:
        out_text = f"runs/{name}"
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", out_text):
        r.fail(
            "output",
            f"{out_text!r} is a URI; expected a folder path (the run keeps its resume state, "
            "checkpoints and Ray storage as files there): on a cluster, a shared filesystem "
            "(e.g. an NFS mount) at the same absolute path on every node",
        )
    out_path = Path(out_text).expanduser().resolve()

    ml = r.mapping(
        data.get("mlflow") or {},
        "mlflow",
        optional=["tracking_uri", "experiment", "artifact_location"],
    )
    uri = ml.get("tracking_uri")
    if uri is not None:
        uri = _tracking_uri(r, r.string(uri, "mlflow.tracking_uri"))
    artifacts = ml.get("artifact_location")
    if artifacts is not None:
        artifacts = r.string(artifacts, "mlflow.artifact_location")
    res = r.mapping(data.get("resources") or {}, "resources", optional=["cpus", "gpus"])
    ray_cfg = r.mapping(data.get("ray") or {}, "ray", optional=["address"])
    address = ray_cfg.get("address")
    if address is not None:
        address = r.string(address, "ray.address")

    stages = r.mapping(
        data.get("stages") or {}, "stages", optional=["hparams", "supernet", "search", "retrain"]
    )
    groups = [*space.modules, "head", "backbone"]
    hparams, raw_h = _stage(
        r, stages.get("hparams"), "stages.hparams", HparamsStage, extra={"module_lrs": None}
    )
    hparams = replace(hparams, module_lrs=_module_lr_grid(r, raw_h.get("module_lrs"), groups))
    supernet, raw_s = _stage(
        r,
        stages.get("supernet"),
        "stages.supernet",
        SupernetStage,
        extra={"module_lr": None, "module_weight_decay": None},
    )
    supernet = replace(supernet, **_multipliers(r, raw_s, "stages.supernet", groups))
    _check_sampling(r, supernet, space)
    if isinstance(stages.get("search"), dict) and "parallel_candidates" in stages["search"]:
        r.fail(
            "stages.search.parallel_candidates",
            "no longer offered: scoring candidates in threads on one GPU measured slower "
            "(0.77x on an H200); to fill a GPU, let trials share it with resources.gpus: 0.25",
        )
    search, _ = _stage(r, stages.get("search"), "stages.search", SearchStage)
    if hparams.module_lrs and not search.enabled:
        r.fail(
            "stages.hparams.module_lrs",
            "sweeps the supernet's module multipliers, but the search (and so the supernet) "
            "is disabled; give baselines their rates with stages.retrain.module_lr",
        )
    if hparams.sweep_searched and not (hparams.enabled and search.enabled):
        r.fail(
            "stages.hparams.sweep_searched",
            "sweeps the searched subnets' retraining rates after the search; it needs "
            + (
                "stages.hparams.enabled: true"
                if search.enabled
                else "the search (stages.search.enabled is false)"
            ),
        )
    if search.algorithm not in ALGORITHMS:
        r.fail(
            "stages.search.algorithm",
            f"{search.algorithm!r} is not one of: {', '.join(ALGORITHMS)}",
        )
    if search.cost not in ("params", "flops"):
        r.fail("stages.search.cost", f"{search.cost!r} is not one of: params, flops")
    if not isinstance(search.options, dict):
        r.fail("stages.search.options", f"expected a mapping, got {search.options!r}")
    for key, value in search.options.items():
        problem = option_problem(search.algorithm, str(key), value)
        if problem:
            r.fail(f"stages.search.options.{key}", problem)
    retrain, raw = _stage(
        r,
        stages.get("retrain"),
        "stages.retrain",
        RetrainStage,
        extra={"baselines": None, "module_lr": None, "module_weight_decay": None},
        internal=("full_finetune",),
    )
    retrain = replace(retrain, **_multipliers(r, raw, "stages.retrain", groups))
    baselines, full = {}, []
    for bname, value in (
        r.mapping(raw.get("baselines") or {}, "stages.retrain.baselines", open_keys=True)
    ).items():
        if isinstance(value, str):
            if value not in (LINEAR_PROBE, FULL_FINETUNE):
                r.fail(
                    f"stages.retrain.baselines.{bname}",
                    f"{value!r} is not a subnet; expected a subnet mapping, "
                    f"{LINEAR_PROBE!r} or {FULL_FINETUNE!r}",
                )
            if isinstance(space.backbone, ClipSpec) and value in (LINEAR_PROBE, FULL_FINETUNE):
                r.fail(
                    f"stages.retrain.baselines.{bname}",
                    f"{value!r} is for classifier backbones; on a CLIP, an empty subnet ({{}}) "
                    "is zero-shot classification, and full fine-tuning is not offered",
                )
            baselines[bname] = Subnet()
            if value == FULL_FINETUNE:
                full.append(bname)
            continue
        subnet = Subnet.from_data(value, doc, f"stages.retrain.baselines.{bname}")
        unknown = [kind for kind in subnet if kind not in space.modules]
        if unknown:
            r.fail(
                f"stages.retrain.baselines.{bname}",
                f"uses {unknown}, which the space does not hold",
            )
        baselines[bname] = subnet
    retrain = replace(retrain, baselines=baselines, full_finetune=tuple(full))
    for key, stage in (
        ("stages.hparams", hparams),
        ("stages.supernet", supernet),
        ("stages.search", search),
        ("stages.retrain", retrain),
    ):
        _check_ranges(r, key, stage)
    if hparams.enabled:
        for key, stage in (("stages.supernet", supernet), ("stages.retrain", retrain)):
            low = min(hparams.lrs)
            if low < stage.min_lr:
                r.fail(
                    "stages.hparams.lrs",
                    f"sweeps lr {low:g}, below {key}.min_lr ({stage.min_lr:g}): its cosine "
                    "schedule would rise instead of decay; lower min_lr or raise the rates",
                )
    if not search.enabled and not retrain.baselines:
        r.fail(
            "stages.search.enabled",
            "is false and stages.retrain.baselines is empty: the spec has nothing to run",
        )

    return ExperimentSpec(
        name=name,
        path=doc.file,
        datasets=tuple(datasets),
        backbone=backbone,
        space=space,
        seeds=seeds,
        output=out_path,
        mlflow_uri=uri,
        mlflow_experiment=r.string(ml.get("experiment", name), "mlflow.experiment"),
        cpus=r.number(res.get("cpus", 1), "resources.cpus", minimum=0),
        gpus=r.number(res.get("gpus", 0), "resources.gpus", minimum=0),
        ray_address=address,
        hparams=hparams,
        supernet=supernet,
        search=search,
        retrain=retrain,
        mlflow_artifacts=artifacts,
    )


#: What each stage setting must satisfy beyond its type (defaults all do): a check, and what
#: was expected, for the error message.
RANGES: dict[str, tuple[Any, str]] = {
    "epochs": (lambda v: v >= 1, "at least 1"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "eval_batch_size": (lambda v: v >= 1, "at least 1"),
    "checkpoint_every": (lambda v: v >= 1, "at least 1"),
    "eval_subnets": (lambda v: v >= 1, "at least 1"),
    "grace_period": (lambda v: v >= 1, "at least 1"),
    "reduction_factor": (lambda v: v >= 2, "at least 2"),
    "subnets_per_step": (lambda v: v >= 1, "at least 1"),
    "lr": (lambda v: v > 0, "above 0"),
    "label_smoothing": (lambda v: v < 1, "below 1 (0 is none, 0.1 is usual)"),
    "lrs": (lambda v: all(x > 0 for x in v), "rates above 0"),
    "crop_pad": (lambda v: v <= 64, "at most 64 pixels"),
}


def _check_ranges(r: Reader, key: str, stage: Any) -> None:
    """Each setting in its range, and the settings of a training stage consistent with each
    other: found here, not in a trial after Ray started."""
    for name, value in asdict(stage).items():
        if name in RANGES and not isinstance(value, bool):
            check, expected = RANGES[name]
            if not check(value):
                r.fail(f"{key}.{name}", f"expected {expected}, got {value!r}")
    if isinstance(stage, TrainingStage):
        if stage.warmup_epochs > stage.epochs:
            r.fail(
                f"{key}.warmup_epochs",
                f"{stage.warmup_epochs} warm-up epochs exceed the stage's {stage.epochs} epochs",
            )
        if stage.min_lr > stage.lr:
            r.fail(
                f"{key}.min_lr",
                f"{stage.min_lr:g} is above lr ({stage.lr:g}): the cosine schedule would rise "
                "instead of decay",
            )
    if isinstance(stage, HparamsStage) and stage.enabled and stage.grace_period > stage.epochs:
        r.fail(
            f"{key}.grace_period",
            f"{stage.grace_period} exceeds the sweep's {stage.epochs} epochs",
        )


def _check_layout(
    r: Reader, key: str, fmt: str, folder: Path, variants: list[tuple[int | None, int | None]]
) -> None:
    """The files a format reads are there (their contents are checked when read, before the
    first trial): VTAB-1k's four lists, an ImageFolder's three split folders, a few-shot
    dataset's lists for every shot and split seed."""
    from nas.data.formats import VTAB_SPLITS, few_shot_files

    if fmt == "vtab":
        missing = [n for n in VTAB_SPLITS.values() if not (folder / n).is_file()]
    elif fmt == "imagefolder":
        missing = [f"{n}/" for n in ("train", "val", "test") if not (folder / n).is_dir()]
    else:
        missing = sorted(
            {
                str(p.relative_to(folder))
                for shots, seed in variants
                for p in few_shot_files(folder, shots or 0, seed or 0).values()
                if not p.is_file()
            }
        )
    if missing:
        r.fail(f"{key}.root", f"{folder} lacks {', '.join(missing)} (the {fmt} layout)")


def _tracking_uri(r: Reader, uri: str) -> str:
    """An MLflow tracking URI whose form MLflow can open (checked here, before anything runs)."""
    from nas.tracking import uri_problem

    problem = uri_problem(uri)
    if problem:
        r.fail("mlflow.tracking_uri", problem)
    return uri


def _multipliers(
    r: Reader, raw: dict[str, Any], key: str, groups: list[str]
) -> dict[str, dict[str, float]]:
    """``module_lr`` and ``module_weight_decay`` of a training stage: a mapping from a module
    kind of the space (or ``head``, ``backbone``) to a multiplier >= 0."""
    out = {}
    for name in ("module_lr", "module_weight_decay"):
        k = f"{key}.{name}"
        value = raw.get(name)
        value = r.mapping({} if value is None else value, k, optional=groups)
        out[name] = {kind: _finite(r, v, f"{k}.{kind}") for kind, v in value.items()}
    return out


def _finite(r: Reader, value: Any, key: str) -> float:
    number = r.number(value, key, minimum=0)
    if not math.isfinite(number):
        r.fail(key, f"{value!r} is not a finite number")
    return number


def _module_lr_grid(r: Reader, value: Any, groups: list[str]) -> dict[str, tuple[float, ...]]:
    k = "stages.hparams.module_lrs"
    grid = {}
    groups = [g for g in groups if g != "backbone"]  # the supernet's backbone is frozen
    for kind, values in r.mapping({} if value is None else value, k, optional=groups).items():
        values = values if isinstance(values, list) else [values]
        if not values:
            r.fail(f"{k}.{kind}", "expected a non-empty list of multipliers")
        numbers = [_finite(r, v, f"{k}.{kind}[{i}]") for i, v in enumerate(values)]
        if len(set(numbers)) < len(numbers):
            r.fail(f"{k}.{kind}", f"lists a multiplier twice: {numbers}")
        grid[kind] = tuple(numbers)
    return grid


def _check_sampling(r: Reader, st: SupernetStage, space: SearchSpace) -> None:
    from nas.sampling import STRATEGIES, acceptance

    r.string(st.sampling, "stages.supernet.sampling", choices=STRATEGIES)
    if not 0 <= st.distill <= 1:  # NaN too
        r.fail("stages.supernet.distill", f"{st.distill} is not a weight in [0, 1]")
    if st.subnets_per_step < 1 and not st.sandwich:
        r.fail(
            "stages.supernet.subnets_per_step",
            "0 trains no subnet; expected >= 1 (0 only with sandwich: true)",
        )
    if st.in_budget and not space.budget.is_set:
        r.fail("stages.supernet.in_budget", "the space has no budget to sample within")
    if st.in_budget and (share := acceptance(space)) < MIN_ACCEPTANCE:
        r.fail(
            "stages.supernet.in_budget",
            f"only {share:.2%} of the supernet's draws meet the budget ({space.budget.params}); "
            f"redrawing needs at least {MIN_ACCEPTANCE:.0%}: widen the budget or narrow the "
            "space's dims and depths to the budget",
        )


def load_spec(
    path: str | Path, *, output: str | Path | None = None, check_data: bool = True
) -> ExperimentSpec:
    return parse_spec(load_yaml(path), output=output, check_data=check_data)
