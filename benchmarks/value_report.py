"""The search-value experiment's report (``benchmarks.value``): searched minus each control,
pooled over (task, seed) pairs with paired t intervals, the flat means over tasks, its
markdown tables, and NOAH+PGN against PGN alone read back from a pipeline run's MLflow store.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks.stats import paired, span

#: The controls that ``value --own-lr`` also retrains at their own swept rate.
OWN_LR_ROLES = ("searched", "random_subnet", "random_search", "largest_in_budget")


#: The controls the searched winner is compared with, as named in the issue's JSON.
CONTROLS = ("random_subnet", "random_search", "largest_in_budget", "best_single_module")


def noah_pgn_versus_pgn(uri: str) -> dict:
    """NOAH+PGN's searched winner against the ``pgn`` baseline (PGN alone), both retrained and
    tested once in one run of ``experiments/benchmark_mini_vtab_pgn.yaml``, read back from its
    MLflow store: the flat-mean difference over tasks (seed means) in points, and the paired
    (task, seed) differences with their 95% interval."""
    # Only this report reads an MLflow store: the rest of the experiment never imports MLflow.
    from nas.core.errors import NasError
    from nas.pipeline.reports import method_of, results_from_mlflow

    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise SystemExit(f"--pgn-store {uri}: no such MLflow database")
    try:
        rows = results_from_mlflow(uri)["rows"]
    except NasError as exc:
        raise SystemExit(f"--pgn-store {exc}") from None
    acc: dict[tuple[str, int], dict[str, float]] = {}
    for r in rows:
        method = method_of(r)
        if method in ("searched", "pgn"):
            acc.setdefault((r["dataset"], r["seed"]), {})[method] = r["test_acc"]
    both = {k: v for k, v in acc.items() if len(v) == 2}
    if not both:
        raise SystemExit(f"{uri}: no (task, seed) with both the searched winner and PGN alone")
    tasks = sorted({task for task, _ in both})
    per_task = {
        t: {
            m: statistics.mean(v[m] for (tt, _), v in both.items() if tt == t)
            for m in ("searched", "pgn")
        }
        for t in tasks
    }
    flat = {m: statistics.mean(v[m] for v in per_task.values()) for m in ("searched", "pgn")}
    diffs = paired([100 * (v["searched"] - v["pgn"]) for v in both.values()])
    minus = 100 * (flat["searched"] - flat["pgn"])
    return {
        "minus_points": minus,
        "paired": diffs,
        "flat_mean": flat,
        "per_task": per_task,
        "pairs": len(both),
        "store": uri,
        "line": f"NOAH+PGN - PGN alone: {minus:+.2f} points flat over {len(tasks)} tasks "
        f"({len(both)} pairs, 95% interval {span(diffs)})",
    }


def summarise(rows: list[dict]) -> dict[str, Any]:
    """Searched minus each control, pooled over every (task, seed) pair (paired t interval),
    and the flat means over tasks of the seed-averaged accuracies (tasks with every seed)."""
    out: dict = {"pooled_minus": {}, "flat_mean": {}, "lines": []}
    if not rows:
        return out
    for control in CONTROLS:
        diffs = [100 * (r["searched_test"] - r[f"{control}_test"]) for r in rows]
        out["pooled_minus"][control] = paired(diffs)
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    for name in ("searched", *CONTROLS):
        per_task = [statistics.mean(r[f"{name}_test"] for r in v) for v in by_task.values()]
        out["flat_mean"][name] = statistics.mean(per_task)
    taus = [r["kendall_tau"] for r in rows if r["kendall_tau"] is not None]
    out["kendall_tau_mean"] = statistics.mean(taus) if taus else None
    out["pairs"], out["tasks"] = len(rows), sorted(by_task)
    out["lines"].append(f"{len(rows)} (task, seed) pairs over {len(by_task)} tasks")
    for control, p in out["pooled_minus"].items():
        out["lines"].append(
            f"searched - {control}: {p['mean']:+.2f} points (95% interval {span(p)})"
        )
    flat = ", ".join(f"{k} {100 * v:.2f}" for k, v in out["flat_mean"].items())
    out["lines"].append(f"flat means: {flat}")
    out["own_lr_minus"] = {}
    for other in OWN_LR_VERSUS:  # the searched winner at its own swept rate, where measured
        both = [r for r in rows if "searched_own_lr_test" in r and f"{other}_test" in r]
        if len(both) < 2:
            continue
        diffs = [100 * (r["searched_own_lr_test"] - r[f"{other}_test"]) for r in both]
        p = out["own_lr_minus"][other] = paired(diffs)
        p["ahead"] = sum(d > 0 for d in diffs)
        out["lines"].append(
            f"searched (own lr) - {other}: {p['mean']:+.2f} points (95% interval "
            f"{span(p)}, {p['n']} pairs, ahead on {p['ahead']})"
        )
    return out


#: What the searched winner retrained at its own swept rate is compared with.
OWN_LR_VERSUS = (
    "best_single_module",
    "random_subnet_own_lr",
    "random_search_own_lr",
    "largest_in_budget_own_lr",
    "searched",
)


def table(rows: list[dict], summary: dict) -> str:
    """Markdown: one row per (task, seed), test accuracy in %, then the pooled differences."""
    head = ["task", "seed", "tau", "searched", "random subnet", "random search"]
    head += ["largest in budget", "best single module"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        tau = "—" if r["kendall_tau"] is None else f"{r['kendall_tau']:+.2f}"
        cells = [r["task"], str(r["seed"]), tau, f"{100 * r['searched_test']:.1f}"]
        cells += [f"{100 * r[f'{c}_test']:.1f}" for c in CONTROLS[:3]]
        cells.append(f"{100 * r['best_single_module_test']:.1f} ({r['best_single_module']})")
        lines.append("| " + " | ".join(cells) + " |")
    flat = summary.get("flat_mean", {})
    if flat:
        cells = ["**flat mean**", "", "", f"{100 * flat['searched']:.2f}"]
        cells += [f"{100 * flat[c]:.2f}" for c in CONTROLS]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| searched minus | mean (points) | 95% interval | pairs |")
    lines.append("|---|---|---|---|")
    for control, p in summary.get("pooled_minus", {}).items():
        lines.append(f"| {control.replace('_', ' ')} | {p['mean']:+.2f} | {span(p)} | {p['n']} |")
    own = [r for r in rows if "searched_own_lr_test" in r]
    if own:
        lines += ["", "Every one at its own swept rate (rate in brackets), test accuracy in %:", ""]
        head = ["task", "seed", "searched", *(c.replace("_", " ") for c in OWN_LR_ROLES[1:])]
        lines += ["| " + " | ".join([*head, "best single module"]) + " |"]
        lines.append("|---" * (len(head) + 1) + "|")
        for r in own:
            cells = [r["task"], str(r["seed"])]
            for role in OWN_LR_ROLES:
                test = r.get(f"{role}_own_lr_test")
                cells.append("—" if test is None else f"{100 * test:.1f} ({r[f'{role}_own_lr']:g})")
            cells.append(f"{100 * r['best_single_module_test']:.1f} ({r['best_single_module']})")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines += ["| searched (own rate) minus | mean (points) | 95% interval | pairs | ahead |"]
        lines.append("|---|---|---|---|---|")
        for other, p in summary.get("own_lr_minus", {}).items():
            lines.append(
                f"| {other.replace('_', ' ').replace('own lr', '(own rate)')} | "
                f"{p['mean']:+.2f} | {span(p)} | {p['n']} | "
                f"{p['ahead']} |"
            )
    return "\n".join(lines) + "\n"
