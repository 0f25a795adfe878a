"""The stages' settings of an experiment spec (``stages:`` in its YAML): what each stage
accepts, its NOAH defaults, and their validation, so that a bad value is found at load."""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from nas.errors import ConfigError
from nas.search import ALGORITHMS, option_problem
from nas.space import SearchSpace
from nas.subnet import Subnet, too_deep
from nas.validate import Reader
from nas.yamlio import Document
from trainers.train import Schedule, TrainConfig

# Baselines that are not subnets: the head alone on the frozen backbone (the same as an empty
# subnet), and full fine-tuning (every backbone weight trains, with the head).
LINEAR_PROBE, FULL_FINETUNE = "linear-probe", "full-finetune"


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


@dataclass(frozen=True, kw_only=True)
class TrainingStage(Schedule):
    """What a training stage sets: a schedule (``trainers.train.Schedule``) with NOAH's
    defaults for the supernet, overridden per stage."""

    epochs: int = 500
    warmup_epochs: int = 10

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
            **{
                **self.schedule(),
                "lr": lr,
                "weight_decay": weight_decay,
                "module_lr": {**self.module_lr, **(module_lr or {})},
                "module_weight_decay": dict(self.module_weight_decay),
            },
            seed=seed,
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
    anchor_share: float = 0.0  # share of the random draws that are the search's anchors


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
    "anchor_share": 0.0,
}


def hashed(stage: Any) -> dict[str, Any]:
    return {k: v for k, v in asdict(stage).items() if LATER_FIELDS.get(k, ...) != v}


@dataclass(frozen=True)
class SearchStage:
    enabled: bool = True  # false: no supernet and no search; only the baselines are retrained
    algorithm: str = "evolution"
    cost: str = "params"
    options: dict[str, Any] = field(default_factory=dict)
    eval_batch_size: int = 256


@dataclass(frozen=True)
class VerifyStage:
    """Between search and retraining (optional): the search's ``top_k`` best distinct
    candidates, with ``anchors`` also each module alone at its largest size in budget, the
    largest subnets along each module and the spec's baselines, trained alone on train for
    ``epochs`` (a baseline's own swept rate where it has one, else the supernet's), stopped
    early by successive halving (ASHA: ``grace_period``, ``reduction_factor``) on val; the
    best on val is what the later stages retrain."""

    enabled: bool = False
    top_k: int = 5
    anchors: bool = True
    epochs: int = 10
    batch_size: int = 64
    grace_period: int = 2
    reduction_factor: int = 3


@dataclass(frozen=True)
class RetrainStage(TrainingStage):
    epochs: int = 100
    lr: float = 1e-3
    top_k: int = 1
    baselines: dict[str, Subnet] = field(default_factory=dict)
    # Baselines that train the whole backbone too (full fine-tuning; their subnet is empty).
    full_finetune: tuple[str, ...] = ()

    def subnet_baselines(self) -> dict[str, Subnet]:
        """The baselines that are subnets of the space, by name (full fine-tuning is not: its
        empty subnet stands for training the whole backbone)."""
        return {n: s for n, s in self.baselines.items() if n not in self.full_finetune}


class Stages(NamedTuple):
    hparams: HparamsStage
    supernet: SupernetStage
    search: SearchStage
    verify: VerifyStage
    retrain: RetrainStage


def parse_stages(r: Reader, value: Any, space: SearchSpace, doc: Document) -> Stages:
    """A spec's ``stages``: each stage's settings, in range and consistent with each other."""
    stages = r.mapping(
        value or {}, "stages", optional=["hparams", "supernet", "search", "verify", "retrain"]
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
    verify, _ = _stage(r, stages.get("verify"), "stages.verify", VerifyStage)
    if verify.top_k < 1:
        r.fail("stages.verify.top_k", f"expected at least 1, got {verify.top_k!r}")
    if verify.enabled and not search.enabled:
        r.fail(
            "stages.verify.enabled",
            "verifies the search's best candidates, but the search is disabled "
            "(stages.search.enabled is false)",
        )
    retrain, raw = _stage(
        r,
        stages.get("retrain"),
        "stages.retrain",
        RetrainStage,
        extra={"baselines": None, "module_lr": None, "module_weight_decay": None},
        internal=("full_finetune",),
    )
    retrain = replace(retrain, **_multipliers(r, raw, "stages.retrain", groups))
    baselines, full = _parse_baselines(r, raw.get("baselines"), space, doc)
    retrain = replace(retrain, baselines=baselines, full_finetune=tuple(full))
    for key, stage in (
        ("stages.hparams", hparams),
        ("stages.supernet", supernet),
        ("stages.search", search),
        ("stages.verify", verify),
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
    return Stages(hparams, supernet, search, verify, retrain)


#: A baseline's name: it names folders (retrain/<ds>-seed<k>/baseline-NAME), MLflow runs and
#: a column of `nas report --by-method`.
BASELINE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


def _check_baseline_name(r: Reader, name: Any) -> None:
    key = f"stages.retrain.baselines.{name}"
    if not isinstance(name, str) or not BASELINE_NAME.match(name):
        r.fail(
            key,
            f"{name!r} cannot name a baseline: it names folders and runs, so use letters, "
            "digits and _ . + - (up to 64, starting with a letter or digit)",
        )
    if name == "searched":
        r.fail(key, "'searched' names the search's own column in the reports: choose another")


def _parse_baselines(
    r: Reader, raw: Any, space: SearchSpace, doc: Document
) -> tuple[dict[str, Subnet], list[str]]:
    """``stages.retrain.baselines``: name -> a subnet of the space, ``linear-probe`` or
    ``full-finetune`` (the names of the latter are returned apart)."""
    baselines, full = {}, []
    for bname, value in (r.mapping(raw or {}, "stages.retrain.baselines", open_keys=True)).items():
        _check_baseline_name(r, bname)
        if isinstance(value, str) and value.lower().endswith((".yaml", ".yml")):
            subnet = _baseline_file(r, doc, value, f"stages.retrain.baselines.{bname}")
        elif isinstance(value, str):
            if value not in (LINEAR_PROBE, FULL_FINETUNE):
                r.fail(
                    f"stages.retrain.baselines.{bname}",
                    f"{value!r} is not a subnet; expected a subnet mapping, a subnet YAML "
                    f"file (this platform's or one of NOAH's configs), {LINEAR_PROBE!r} or "
                    f"{FULL_FINETUNE!r}",
                )
            if space.backbone.classifies_by_name:
                r.fail(
                    f"stages.retrain.baselines.{bname}",
                    f"{value!r} is for classifier backbones; on a CLIP, an empty subnet ({{}}) "
                    "is zero-shot classification, and full fine-tuning is not offered",
                )
            baselines[bname] = Subnet()
            if value == FULL_FINETUNE:
                full.append(bname)
            continue
        else:
            subnet = Subnet.from_data(value, doc, f"stages.retrain.baselines.{bname}")
        if len(subnet) == 0 and not space.backbone.classifies_by_name:
            r.fail(
                f"stages.retrain.baselines.{bname}",
                f"{value!r} is an empty subnet (every module off), which trains the head alone: "
                f"write {LINEAR_PROBE!r} if that is meant",
            )
        unknown = [kind for kind in subnet if kind not in space.modules]
        if unknown:
            r.fail(
                f"stages.retrain.baselines.{bname}",
                f"uses {unknown}, which the space does not hold",
            )
        deep = too_deep(subnet, space.geometry.depth)
        if deep:
            r.fail(f"stages.retrain.baselines.{bname}", deep)
        limit = 4 * space.geometry.width  # the spaces' own rule: wider is not efficient
        layered = {
            k: c
            for k, c in subnet.items()
            if isinstance(c, tuple) and c and all(isinstance(d, int) for d in c)
        }
        wide = {k: max(c) for k, c in layered.items() if max(c) > limit}
        if wide:
            kind, dim = next(iter(wide.items()))
            r.fail(
                f"stages.retrain.baselines.{bname}",
                f"{kind} dim {dim:,} is above 4 x the backbone's width ({space.geometry.width}): "
                f"expected at most {limit:,} (a module that wide is not parameter-efficient, "
                "and may not fit in memory)",
            )
        baselines[bname] = subnet
    return baselines, full


def _baseline_file(r: Reader, doc: Document, value: str, key: str) -> Subnet:
    """A baseline named by file: a subnet YAML or one of NOAH's subnet configs, relative to
    the spec's folder (its contents, not its path, enter the spec's hash)."""
    from nas.noah_import import load_subnet_file

    path = Path(value).expanduser()
    if not path.is_absolute():
        path = (Path(doc.file).parent if doc.file else Path.cwd()) / path
    if not path.is_file():
        r.fail(key, f"subnet file not found: {path}")
    try:
        return load_subnet_file(path)
    except ConfigError as exc:
        r.fail(key, f"{value}: {exc}")
    raise AssertionError  # r.fail raises


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
    # each subnet is a forward and backward pass of the step: 1e5 would never end a step
    "subnets_per_step": (lambda v: 1 <= v <= 64, "from 1 to 64"),
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
    staged = isinstance(stage, HparamsStage | VerifyStage) and stage.enabled
    if staged and stage.grace_period > stage.epochs:
        what = "sweep" if isinstance(stage, HparamsStage) else "verification"
        r.fail(
            f"{key}.grace_period",
            f"{stage.grace_period} exceeds the {what}'s {stage.epochs} epochs",
        )


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
    return r.number(value, key, minimum=0)  # Reader.number refuses .nan and .inf


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
    if not 0 <= st.anchor_share <= 1:
        r.fail("stages.supernet.anchor_share", f"{st.anchor_share} is not a share in [0, 1]")
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
