"""Reading a spec's ``stages``: each stage's settings (``nas.spec.stages``), each in its range,
the per-module learning-rate multipliers, the supernet's sampling against its space, and what
the stages must agree on; one ConfigError naming the key."""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

from nas.core.validate import Reader
from nas.core.yamlio import Document
from nas.search import ALGORITHMS, option_problem
from nas.space.search_space import SearchSpace
from nas.spec.baselines import parse_baselines
from nas.spec.stages import (
    MIN_ACCEPTANCE,
    HparamsSettings,
    RetrainSettings,
    SearchSettings,
    StageSettings,
    SupernetSettings,
    TrainingSettings,
    VerifySettings,
)
from nas.training.sampling import STRATEGIES, acceptance

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


def check_ranges(r: Reader, key: str, stage: Any) -> None:
    """Each setting in its range, and the settings of a training stage consistent with each
    other: found here, not in a trial after Ray started."""
    for name, value in asdict(stage).items():
        if name in RANGES and not isinstance(value, bool):
            check, expected = RANGES[name]
            if not check(value):
                r.fail(f"{key}.{name}", f"expected {expected}, got {value!r}")
    if isinstance(stage, TrainingSettings):
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
    staged = isinstance(stage, HparamsSettings | VerifySettings) and stage.enabled
    if staged and stage.grace_period > stage.epochs:
        what = "sweep" if isinstance(stage, HparamsSettings) else "verification"
        r.fail(
            f"{key}.grace_period",
            f"{stage.grace_period} exceeds the {what}'s {stage.epochs} epochs",
        )


def multipliers(
    r: Reader, raw: dict[str, Any], key: str, groups: list[str]
) -> dict[str, dict[str, float]]:
    """``module_lr`` and ``module_weight_decay`` of a training stage: a mapping from a module
    kind of the space (or ``head``, ``backbone``) to a multiplier >= 0."""
    out = {}
    for name in ("module_lr", "module_weight_decay"):
        k = f"{key}.{name}"
        value = raw.get(name)
        value = r.mapping({} if value is None else value, k, optional=groups)
        out[name] = {kind: finite(r, v, f"{k}.{kind}") for kind, v in value.items()}
    return out


def finite(r: Reader, value: Any, key: str) -> float:
    return r.number(value, key, minimum=0)  # Reader.number refuses .nan and .inf


def module_lr_grid(r: Reader, value: Any, groups: list[str]) -> dict[str, tuple[float, ...]]:
    k = "stages.hparams.module_lrs"
    grid = {}
    groups = [g for g in groups if g != "backbone"]  # the supernet's backbone is frozen
    for kind, values in r.mapping({} if value is None else value, k, optional=groups).items():
        values = values if isinstance(values, list) else [values]
        if not values:
            r.fail(f"{k}.{kind}", "expected a non-empty list of multipliers")
        numbers = [finite(r, v, f"{k}.{kind}[{i}]") for i, v in enumerate(values)]
        if len(set(numbers)) < len(numbers):
            r.fail(f"{k}.{kind}", f"lists a multiplier twice: {numbers}")
        grid[kind] = tuple(numbers)
    return grid


def check_sampling(r: Reader, st: SupernetSettings, space: SearchSpace) -> None:

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


def parse_stages(r: Reader, value: Any, space: SearchSpace, doc: Document) -> StageSettings:
    """A spec's ``stages``: each stage's settings, in range and consistent with each other."""
    stages = r.mapping(
        value or {}, "stages", optional=["hparams", "supernet", "search", "verify", "retrain"]
    )
    groups = [*space.modules, "head", "backbone"]
    hparams, raw_h = _stage(
        r, stages.get("hparams"), "stages.hparams", HparamsSettings, extra={"module_lrs": None}
    )
    hparams = replace(hparams, module_lrs=module_lr_grid(r, raw_h.get("module_lrs"), groups))
    supernet, raw_s = _stage(
        r,
        stages.get("supernet"),
        "stages.supernet",
        SupernetSettings,
        extra={"module_lr": None, "module_weight_decay": None},
    )
    supernet = replace(supernet, **multipliers(r, raw_s, "stages.supernet", groups))
    check_sampling(r, supernet, space)
    if isinstance(stages.get("search"), dict) and "parallel_candidates" in stages["search"]:
        r.fail(
            "stages.search.parallel_candidates",
            "no longer offered: scoring candidates in threads on one GPU measured slower "
            "(0.77x on an H200); to fill a GPU, let trials share it with resources.gpus: 0.25",
        )
    search, _ = _stage(r, stages.get("search"), "stages.search", SearchSettings)
    _check_search(r, hparams, search)
    verify, _ = _stage(r, stages.get("verify"), "stages.verify", VerifySettings)
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
        RetrainSettings,
        extra={"baselines": None, "module_lr": None, "module_weight_decay": None},
        internal=("full_finetune",),
    )
    retrain = replace(retrain, **multipliers(r, raw, "stages.retrain", groups))
    baselines, full = parse_baselines(r, raw.get("baselines"), space, doc)
    retrain = replace(retrain, baselines=baselines, full_finetune=tuple(full))
    parsed = StageSettings(hparams, supernet, search, verify, retrain)
    _check_rates(r, parsed)
    return parsed


def _check_search(r: Reader, hparams: HparamsSettings, search: SearchSettings) -> None:
    """The search against the sweeps that need it, its algorithm, cost and options."""
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


def _check_rates(r: Reader, stages: StageSettings) -> None:
    """Every setting in its range, the sweep's rates above the schedules' floors, and
    something to run."""
    hparams, supernet, search, _, retrain = stages
    for key, stage in zip(
        ("stages.hparams", "stages.supernet", "stages.search", "stages.verify", "stages.retrain"),
        stages,
        strict=True,
    ):
        check_ranges(r, key, stage)
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
