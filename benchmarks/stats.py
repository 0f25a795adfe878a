"""The statistics the benchmarks report: binomial intervals of an accuracy, paired t
intervals of differences, Kendall's tau and the ground truth's own agreement between seeds.

scipy is the ``bench`` extra's (``pip install -e .[bench]``): the package itself never needs it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

from scipy.stats import kendalltau, t


def interval(p: float, n: int) -> float:
    """Half-width of a 95% normal-approximation interval of an accuracy ``p`` over ``n``
    images."""
    return 1.96 * math.sqrt(max(p * (1 - p), 1e-12) / n)


def paired(diffs: Sequence[float]) -> dict[str, Any]:
    """Mean of paired differences with a two-sided 95% t interval (``low``/``high`` None from
    a single pair: no interval, and strict JSON has no infinity)."""
    n = len(diffs)
    mean = statistics.mean(diffs)
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    half = t.ppf(0.975, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def span(p: Mapping[str, Any]) -> str:
    """A ``paired`` interval as text: "-1.20 to +0.40", or "—" without one."""
    return "—" if p["low"] is None else f"{p['low']:+.2f} to {p['high']:+.2f}"


def tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b between two scorings of the same items."""
    return float(kendalltau(a, b)[0])


def tau_p(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Kendall's tau-b and its two-sided p-value."""
    result = kendalltau(a, b)
    return float(result[0]), float(result[1])


def noise_ceiling(truth: Mapping[Any, Sequence[float]]) -> float:
    """Mean Kendall tau between the ground truth's seeds, pair by pair: how well one training
    seed ranks the subnets as another does (the seed average is steadier than one seed)."""
    columns = list(zip(*truth.values(), strict=True))
    taus = [tau(a, b) for a, b in combinations(columns, 2)]
    return statistics.mean(taus) if taus else float("nan")


def seed_mean(truth: Mapping[Any, Sequence[float]]) -> list[float]:
    """Each item's mean over its seeds, in the mapping's order."""
    return [statistics.mean(v) for v in truth.values()]
