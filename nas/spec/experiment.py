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
  verify: {enabled: true, top_k: 5, anchors: true, epochs: 10}   # optional: README
  retrain: {top_k: 1, epochs: 10, lr: 1.0e-3, baselines: {lora8: {lora: {depth: 6, dims: 8}}}}
```
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from nas.core.errors import ConfigError
from nas.core.validate import Reader
from nas.core.yamlio import Document, load_yaml, to_plain
from nas.families.vit.spec import portable
from nas.space.backbones import Backbone
from nas.space.search_space import (
    Bounds,
    Budget,
    SearchSpace,
    _check_budget_reachable,
    _parse_bounds,
    load_space,
    parse_backbone_value,
)
from nas.spec.baselines import FULL_FINETUNE
from nas.spec.datasets import DatasetSpec, parse_datasets
from nas.spec.stage_parser import parse_stages
from nas.spec.stages import (
    HparamsSettings,
    RetrainSettings,
    SearchSettings,
    SupernetSettings,
    VerifySettings,
    hashed,
)


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    path: str | None
    datasets: tuple[DatasetSpec, ...]
    backbone: Backbone
    space: SearchSpace
    seeds: tuple[int, ...]
    output: Path
    mlflow_uri: str | None
    mlflow_experiment: str
    cpus: float
    gpus: float
    ray_address: str | None
    hparams: HparamsSettings
    supernet: SupernetSettings
    search: SearchSettings
    retrain: RetrainSettings
    verify: VerifySettings = field(default_factory=VerifySettings)

    mlflow_artifacts: str | None = None  # where a new experiment's artifacts go
    #: register each dataset's searched winners in MLflow's Model Registry (alias champion)
    mlflow_register: bool = False
    description: str | None = None  # the MLflow experiment's description

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
                **({"hparams": hashed(self.hparams)} if self.hparams.enabled else {}),
                "supernet": hashed(self.supernet),
                "search": asdict(self.search),
                # the verified winner is what retrains; left out when off (earlier hashes)
                **({"verify": asdict(self.verify)} if self.verify.enabled else {}),
                "retrain": {
                    **{
                        k: v
                        for k, v in hashed(replace(self.retrain, baselines={})).items()
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
        """The run's identity: what determines its results, the shipped backbones' paths
        relative to their folder (``nas.families.vit.spec.portable``)."""
        blob = json.dumps(portable(self.to_data()), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def legacy_hash(self) -> str:
        """The hash of runs recorded before ``hash`` left out where the project is checked
        out (a shipped backbone's absolute path): such a run, at the same place, continues."""
        blob = json.dumps(self.to_data(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _parse_space(r: Reader, data: dict[str, Any], base: Path) -> tuple[SearchSpace, Any]:
    """The search space (a shipped name or a YAML path relative to the spec), the backbone
    (the space's own unless given; its geometry must be the space's) and the budget."""
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

    return space, backbone


#: numpy's generators take 32-bit seeds: a larger seed would repeat a smaller one's models.
SEED_MAX = 2**32 - 1


def _parse_output(r: Reader, data: dict[str, Any], name: str, output: str | Path | None) -> Path:
    """The output folder: ``output`` given to ``nas run`` wins, then the spec's, then
    runs/<name>; a folder path (never a URI), made absolute."""
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
    if not out_text.strip():
        r.fail("output", "expected a folder path, got an empty string")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", out_text):
        r.fail(
            "output",
            f"{out_text!r} is a URI; expected a folder path (the run keeps its resume state, "
            "checkpoints and Ray storage as files there): on a cluster, a shared filesystem "
            "(e.g. an NFS mount) at the same absolute path on every node",
        )
    out = Path(out_text).expanduser().resolve()
    long = next((part for part in out.parts if len(part.encode()) > 255), None)
    if long is not None:
        r.fail("output", f"the folder name {long[:40]!r}... is {len(long.encode())} bytes long; "
               "file systems allow 255")  # fmt: skip
    if out.parts[1:2] and out.parts[1] in ("proc", "sys", "dev"):
        r.fail("output", f"{out} lies in /{out.parts[1]}, the kernel's virtual files, where no "
               "run folder can be written; give a folder on a disk")  # fmt: skip
    return out


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

    space, backbone = _parse_space(r, data, base)

    datasets = parse_datasets(r, data["datasets"], base, check_data)
    seeds = r.int_choices(data.get("seeds", [0]), "seeds", minimum=0, maximum=SEED_MAX)
    out_path = _parse_output(r, data, name, output)

    ml = r.mapping(
        data.get("mlflow") or {},
        "mlflow",
        optional=["tracking_uri", "experiment", "artifact_location", "register"],
    )
    register = ml.get("register", False)
    if not isinstance(register, bool):
        r.fail("mlflow.register", f"expected true or false, got {register!r}")
    description = data.get("description")
    if description is not None:
        description = r.string(description, "description")
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

    stages = parse_stages(r, data.get("stages"), space, doc)

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
        hparams=stages.hparams,
        supernet=stages.supernet,
        search=stages.search,
        verify=stages.verify,
        retrain=stages.retrain,
        mlflow_artifacts=artifacts,
        mlflow_register=register,
        description=description,
    )


def _tracking_uri(r: Reader, uri: str) -> str:
    """An MLflow tracking URI whose form MLflow can open (checked here, before anything runs)."""
    from nas.tracking.runs import uri_problem  # MLflow (heavy): only for a spec naming a URI

    problem = uri_problem(uri)
    if problem:
        r.fail("mlflow.tracking_uri", problem)
    return uri


def load_spec(
    path: str | Path, *, output: str | Path | None = None, check_data: bool = True
) -> ExperimentSpec:
    return parse_spec(load_yaml(path), output=output, check_data=check_data)
