"""Search spaces declared in YAML: which prompt modules, their choices, the backbone they
assume, and an optional budget.

```yaml
name: noah-vtab                    # optional, defaults to the file name
description: NOAH's VTAB-1k space  # optional
backbone:                          # a shipped backbone's name (vit_fmnist), a backbone.yaml, or
  model: vit_base_patch16_224      # a timm model name
  overrides: {}                    # optional timm.create_model arguments (img_size, depth, ...)
modules:                           # one entry per registered kind (vpt, lora, adapter)
  vpt:
    dims: [1, 5, 10]               # per-layer dimension choices (0 = absent on that layer)
    depths: [3, 6, 9, 12]          # the module acts on layers 0..depth-1
    max_dim: 10                    # supernet allocation (default: the largest dim)
    options: {dropout: 0.0}        # optional module hyper-parameters
budget:                            # optional; bounds are inclusive, either may be omitted
  params: {max: 640000}            # trainable module parameters (head excluded)
  flops: {max: 2.0e9}              # matmul FLOPs added per image
```
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nas.core.errors import ConfigError
from nas.core.paths import SPACES_DIR
from nas.core.registry import resolve
from nas.core.validate import Reader
from nas.core.yamlio import Document, load_yaml, to_plain
from nas.modules import REGISTRY, kind_class
from nas.modules.options import Options
from nas.modules.spaces import ModuleSpace
from nas.space.backbones import DEFAULT_FAMILY, FAMILIES, Backbone
from nas.space.cost import added_flops, subnet_params
from nas.space.subnet import Subnet
from nas.towers.geometry import TowerGeometry

#: FLOPs budgets are counted exactly by enumeration up to this many subnets, else estimated.
EXACT_FLOPS_COUNT_LIMIT = 200_000


@dataclass(frozen=True)
class Bounds:
    low: float | None = None
    high: float | None = None

    def admits(self, value: float) -> bool:
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f">= {self.low:,.0f}")
        if self.high is not None:
            parts.append(f"<= {self.high:,.0f}")
        return " and ".join(parts) or "unbounded"


@dataclass(frozen=True)
class Budget:
    """Inclusive bounds on trainable module parameters and on added FLOPs."""

    params: Bounds = Bounds()
    flops: Bounds = Bounds()

    @property
    def is_set(self) -> bool:
        return self.params != Bounds() or self.flops != Bounds()

    def admits(self, subnet: Subnet, g: TowerGeometry) -> bool:
        if not self.params.admits(subnet_params(subnet, g)):
            return False
        return self.flops == Bounds() or self.flops.admits(added_flops(subnet, g))

    def to_data(self) -> dict[str, Any]:
        out = {}
        for name in ("params", "flops"):
            b = getattr(self, name)
            if b != Bounds():
                out[name] = {k: v for k, v in (("min", b.low), ("max", b.high)) if v is not None}
        return out


@dataclass(frozen=True)
class BudgetCount:
    fitting: int
    exact: bool  # False: estimated from a uniform sample of the space


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space."""

    name: str
    backbone: Backbone
    modules: dict[str, ModuleSpace]
    budget: Budget
    description: str = ""
    path: str | None = None

    @property
    def geometry(self) -> TowerGeometry:
        return self.backbone.geometry()

    # -- membership and sampling ---------------------------------------------------------
    def contains(self, subnet: Subnet) -> bool:
        """Whether ``subnet`` is one of this space's subnets (budget not considered)."""
        if any(kind not in self.modules for kind in subnet):
            return False
        return all(space.contains(subnet[kind]) for kind, space in self.modules.items())

    def admits(self, subnet: Subnet) -> bool:
        """In the space and within the budget."""
        return self.contains(subnet) and self.budget.admits(subnet, self.geometry)

    def sample(self, rng: random.Random) -> Subnet:
        """NOAH's supernet sampling: per module a uniform depth, then a uniform dim per layer."""
        return Subnet({kind: space.sample(rng) for kind, space in self.modules.items()})

    def sample_uniform(self, rng: random.Random) -> Subnet:
        """A subnet drawn uniformly from all subnets of the space."""
        return Subnet({kind: space.sample_uniform(rng) for kind, space in self.modules.items()})

    def subnets(self):
        """Every subnet of the space (only sensible for small spaces)."""
        kinds = list(self.modules)
        for combo in itertools.product(*(self.modules[k].choices() for k in kinds)):
            yield Subnet(dict(zip(kinds, combo, strict=True)))

    def options(self) -> dict[str, Options]:
        return {kind: space.options for kind, space in self.modules.items()}

    # -- statistics --------------------------------------------------------------------------
    def count(self) -> int:
        return math.prod(space.count() for space in self.modules.values())

    def smallest(self) -> Subnet:
        g = self.geometry
        return Subnet({k: s.smallest(g) for k, s in self.modules.items()})

    def largest(self) -> Subnet:
        g = self.geometry
        return Subnet({k: s.largest(g) for k, s in self.modules.items()})

    def count_within(self, params: Bounds) -> int:
        """Exact number of subnets whose trainable parameters lie within ``params``: the
        modules' cost distributions convolved (the one with the most distinct costs last, read
        by bisection), partial sums above the upper bound dropped as they arise (a module's
        cost is never negative, so they cannot come back within it)."""
        g = self.geometry
        dists = sorted((space.cost_distribution(g) for space in self.modules.values()), key=len)
        high = math.inf if params.high is None else params.high
        head: Counter[int] = Counter({0: 1})
        for dist in dists[:-1]:
            ordered = sorted(dist.items())
            nxt: Counter[int] = Counter()
            for a, ca in head.items():
                room = high - a
                for b, cb in ordered:
                    if b > room:
                        break
                    nxt[a + b] += ca * cb
            head = nxt
        last = sorted(dists[-1].items())
        keys = [k for k, _ in last]
        cumulative = list(itertools.accumulate(c for _, c in last))
        total = 0
        for cost, count in head.items():
            lo = -math.inf if params.low is None else params.low - cost
            hi = high - cost
            i, j = bisect.bisect_left(keys, lo), bisect.bisect_right(keys, hi)
            if j > i:
                total += count * (cumulative[j - 1] - (cumulative[i - 1] if i else 0))
        return total

    def count_in_budget(self, samples: int = 20_000, seed: int = 0) -> BudgetCount:
        if self.budget.flops == Bounds():
            return BudgetCount(self.count_within(self.budget.params), exact=True)
        if self.count() <= EXACT_FLOPS_COUNT_LIMIT:
            g = self.geometry
            fitting = sum(1 for s in self.subnets() if self.budget.admits(s, g))
            return BudgetCount(fitting, exact=True)
        rng = random.Random(seed)
        g = self.geometry
        hits = sum(self.budget.admits(self.sample_uniform(rng), g) for _ in range(samples))
        return BudgetCount(round(self.count() * hits / samples), exact=False)

    def to_data(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["backbone"] = self.backbone.to_dict()
        out["modules"] = {k: s.to_data() for k, s in self.modules.items()}
        if self.budget.is_set:
            out["budget"] = self.budget.to_data()
        return to_plain(out)


# ---------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------


def resolve_space_path(name_or_path: str | Path) -> Path:
    """A file path as given, or the name of a space shipped in ``search_spaces/``."""
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path
    shipped = SPACES_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    known = ", ".join(sorted(p.stem for p in SPACES_DIR.glob("*.yaml")))
    raise ConfigError(
        f"no such file, and no shipped search space of that name (shipped: {known})", file=path
    )


def _parse_bounds(reader: Reader, value: Any, key: str) -> Bounds:
    value = reader.mapping(value, key, optional=["min", "max"])
    if not value:
        reader.fail(key, "give 'min', 'max' or both")
    low = reader.number(value["min"], f"{key}.min", minimum=0) if "min" in value else None
    high = (
        reader.number(value["max"], f"{key}.max", minimum=0, finite=False)
        if "max" in value
        else None
    )
    if low is not None and high is not None and low > high:
        reader.fail(key, f"min {low:,.0f} is above max {high:,.0f}")
    return Bounds(low, high)


def parse_backbone_value(value: Any, reader: Reader, base: Path) -> Backbone:
    """A shipped backbone's name (``vit_fmnist``) or another family's (``clip_fmnist``), a path
    to a backbone.yaml or a family's file (clip.yaml), a mapping ``{FAMILY: NAME_OR_PATH}``
    (``{clip: ...}``), or a mapping ``{model, overrides, weights, mean, std}``; relative paths
    are relative to ``base``."""

    def local(text: str) -> str | Path:
        path = Path(text)
        return text if not path.suffix or path.is_absolute() else base / path

    family = next((f for k, f in FAMILIES.items() if isinstance(value, dict) and k in value), None)
    if family is not None:
        reader.mapping(value, "backbone", required=[family.key])
        value = reader.string(value[family.key], f"backbone.{family.key}")
        try:
            return family.load_spec(local(value))
        except ConfigError as exc:
            reader.fail(f"backbone.{family.key}", f"{value!r}: {exc}")
    default = FAMILIES[DEFAULT_FAMILY]
    if isinstance(value, str):
        try:
            family = next((f for f in FAMILIES.values() if f.claims_value(local(value))), default)
            return family.load_spec(local(value))
        except ConfigError as exc:
            reader.fail("backbone", f"{value!r}: {exc}")
    bb = reader.mapping(
        value,
        "backbone",
        required=["model"],
        optional=["overrides", "weights", "mean", "std", "name", "geometry"],
    )
    return resolve(default.mapping)(bb, reader, "backbone", base)


def parse_space(doc: Document) -> SearchSpace:
    """Validate a parsed search-space document (see the module docstring for the format)."""
    reader = Reader(doc)
    data = reader.mapping(
        doc.data, "", required=["backbone", "modules"], optional=["name", "description", "budget"]
    )
    default_name = Path(doc.file).stem if doc.file else "space"
    name = reader.string(data["name"], "name") if "name" in data else default_name
    description = reader.string(data["description"], "description") if "description" in data else ""

    base = Path(doc.file).parent if doc.file else Path.cwd()
    backbone = parse_backbone_value(data["backbone"], reader, base)
    try:
        geometry = backbone.geometry()
    except ConfigError as exc:
        raise doc.error(exc.key or "backbone", exc.message) from None

    modules_data = reader.mapping(data["modules"], "modules", optional=list(REGISTRY))
    if not modules_data:
        reader.fail("modules", f"declare at least one module ({', '.join(REGISTRY)})")
    modules = {}
    for kind in REGISTRY:  # registry order, whatever the file's order
        if kind in modules_data:
            cls = kind_class(kind)
            modules[kind] = cls.parse_space(modules_data[kind], reader, f"modules.{kind}", geometry)

    budget = Budget()
    if data.get("budget") is not None:
        b = reader.mapping(data["budget"], "budget", optional=["params", "flops"])
        budget = Budget(
            params=_parse_bounds(reader, b["params"], "budget.params")
            if "params" in b
            else Bounds(),
            flops=_parse_bounds(reader, b["flops"], "budget.flops") if "flops" in b else Bounds(),
        )

    space = SearchSpace(name, backbone, modules, budget, description, doc.file)
    if budget.is_set:
        _check_budget_reachable(space, reader)
    return space


def _check_budget_reachable(space: SearchSpace, reader: Reader) -> None:
    g = space.geometry
    lo_p, hi_p = subnet_params(space.smallest(), g), subnet_params(space.largest(), g)
    fitting = space.count_within(space.budget.params)
    if fitting == 0:
        reader.fail(
            "budget.params",
            f"no subnet meets this budget ({space.budget.params}); "
            f"subnets of this space have {lo_p:,} to {hi_p:,} trainable parameters",
        )
    smallest = space.smallest()
    if fitting == 1 and len(smallest) == 0 and space.budget.params.admits(0):
        reader.fail(
            "budget.params",
            f"only the empty subnet (every module off) meets this budget "
            f"({space.budget.params}): there is nothing to search; the smallest module adds "
            f"more (subnets of this space have up to {hi_p:,} trainable parameters)",
        )
    if space.budget.flops != Bounds():
        lo_f, hi_f = added_flops(space.smallest(), g), added_flops(space.largest(), g)
        if (space.budget.flops.high is not None and lo_f > space.budget.flops.high) or (
            space.budget.flops.low is not None and hi_f < space.budget.flops.low
        ):
            reader.fail(
                "budget.flops",
                f"no subnet meets this budget ({space.budget.flops}); "
                f"subnets of this space add {lo_f:,} to {hi_f:,} FLOPs",
            )
        if space.count_in_budget().fitting == 0:
            reader.fail("budget", "no subnet meets the parameter and FLOPs budgets together")


def load_space(name_or_path: str | Path) -> SearchSpace:
    """Load and validate a search space file (or a shipped space by name)."""
    return parse_space(load_yaml(resolve_space_path(name_or_path)))
