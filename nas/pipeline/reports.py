"""The results table of a run: from its output folder or rebuilt from an MLflow store,
per dataset, VTAB-style group means, flat means, and the methods side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nas.core.errors import NasError
from nas.core.jsonio import read_json, write_json
from nas.spec.experiment import ExperimentSpec


def collect_results(spec: ExperimentSpec) -> dict[str, Any]:
    """The results table of a run's output folder (see ``summarise``)."""
    rows = [read_json(p) for p in sorted((spec.output / "retrain").glob("*/*/done.json"))]
    results = {"spec_hash": spec.hash(), **summarise(rows)}
    write_json(spec.output / "results.json", results)
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
        **target_summary(rows),
    }


def target_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per source dataset, the reported subnet's accuracy on each domain-generalisation
    target (mean over seeds; a subset target restricted to its own classes) and their mean."""
    acc: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        if r["role"] == "searched" and r.get("targets"):
            for name, value in r["targets"].items():
                acc.setdefault(r["dataset"], {}).setdefault(name, []).append(value)
    if not acc:
        return {}
    per = {ds: {t: sum(v) / len(v) for t, v in ts.items()} for ds, ts in acc.items()}
    return {
        "targets": per,
        "targets_mean": {ds: sum(ts.values()) / len(ts) for ds, ts in per.items()},
    }


def target_columns(rows: list[dict[str, Any]]) -> tuple[list[str], set[str]]:
    """The targets named by any row (in first-seen order), and those scored over a subset of
    the source's classes (each also has an all-classes column)."""
    names: dict[str, None] = {}
    subset: set[str] = set()
    for r in rows:
        names |= dict.fromkeys(r.get("targets") or {})
        subset |= set(r.get("targets_all_classes") or {})
    return list(names), subset


def rows_from_metrics(metrics: dict[str, float]) -> dict[str, Any]:
    """A results row's target fields rebuilt from its MLflow metrics (``test_acc/<target>``,
    ``test_acc/<target>/all_classes``, ``target_classes/<target>``)."""
    targets, every, classes = {}, {}, {}
    for key, value in metrics.items():
        if key.startswith("test_acc/") and key.endswith("/all_classes"):
            every[key.removeprefix("test_acc/").removesuffix("/all_classes")] = value
        elif key.startswith("test_acc/"):
            targets[key.removeprefix("test_acc/")] = value
        elif key.startswith("target_classes/"):
            classes[key.removeprefix("target_classes/")] = int(value)
    if not targets:
        return {}
    return {"targets": targets, "targets_all_classes": every, "target_classes": classes}


def results_from_mlflow(
    uri: str, experiment: str | None = None, output: str | None = None
) -> dict[str, Any]:
    """The results table rebuilt from an MLflow store alone (its finished retrain runs). Where
    several output folders of one spec share the experiment, ``output`` (a folder, as tagged
    ``nas.output``, or its ``nas.output_id``) says whose runs; without it, one error lists them."""
    from nas.tracking.runs import Tracker  # sets MLflow's telemetry off before MLflow is used

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
    runs = runs_of_one_output(runs, output, f"{uri} (experiment {exps[0].name})")
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
                "mlflow_run_id": run.info.run_id,
                "output_id": t.get("nas.output_id"),
                **rows_from_metrics(m),
            }
        )
    return {**summarise(rows), "experiment_id": exps[0].experiment_id}


def ui_links(uri: str, experiment_id: str, output: str) -> list[str]:
    """The MLflow UI pages of one output folder, as console lines: its retrained models side
    by side (its searched winners first), and its stage runs without the candidates. Each is
    saved as a shared view of the experiment, then linked."""
    # MLflow (heavy): only where a store is known; `nas report` of a results file needs none
    from nas.tracking.runs import Tracker
    from nas.tracking.views import stages_view, ui_link, winners_view

    client = Tracker.client_for(uri)
    return [
        f"MLflow UI, {what}: {ui_link(uri, experiment_id, view(client, experiment_id, output))}"
        for what, view in (
            ("the retrained models side by side", winners_view),
            ("every stage run (candidates left out)", stages_view),
        )
    ]


def runs_of_one_output(runs: list, output: str | None, where: str) -> list:
    """The runs one output folder made: ``output`` names it (its path or its output id);
    without it, the runs must all come from one folder (runs from before output ids count
    as one folder of their own)."""
    folders: dict[str | None, list] = {}
    for run in runs:
        folders.setdefault(run.data.tags.get("nas.output_id"), []).append(run)
    if output is not None:
        resolved = str(Path(output).expanduser().resolve())
        picked = [
            r
            for r in runs
            if r.data.tags.get("nas.output_id") == output
            or r.data.tags.get("nas.output") in (output, resolved)
        ]
        if not picked:
            raise NasError(f"{where}: no finished retrain runs of the output {output!r} "
                           f"(found: {_folders(folders)})")  # fmt: skip
        return picked
    if len(folders) > 1:
        raise NasError(f"{where}: runs of {len(folders)} output folders ({_folders(folders)}); "
                       "choose one with --output FOLDER")  # fmt: skip
    return runs


def _folders(folders: dict[str | None, list]) -> str:
    names = []
    for oid, runs in folders.items():
        path = runs[0].data.tags.get("nas.output")
        names.append(f"{path} (output id {oid})" if oid else "runs from before output ids")
    return ", ".join(sorted(names)) or "none"


def _target_cells(r: dict[str, Any], names: list[str], subset: set[str]) -> str:
    """A row's target columns: each target (its own classes where a subset), a subset target
    also over all classes, then the mean of the targets."""
    if not names:
        return ""
    got, every = r.get("targets") or {}, r.get("targets_all_classes") or {}
    cells = []
    for n in names:
        cells.append(f"{got[n]:.4f}" if n in got else "—")
        if n in subset:
            cells.append(f"{every[n]:.4f}" if n in every else "—")
    mean = f"{sum(got.values()) / len(got):.4f}" if got else "—"
    return " | ".join([*cells, mean]) + " |"


def _target_header(names: list[str], subset: set[str]) -> tuple[str, str]:
    if not names:
        return "", ""
    heads = []
    for n in names:
        heads.append(f"{n} (own classes)" if n in subset else n)
        if n in subset:
            heads.append(f"{n} (all classes)")
    heads.append("targets mean")
    return " | ".join(heads) + " |", "---|" * len(heads)


def results_markdown(results: dict[str, Any]) -> str:
    names, subset = target_columns(results["rows"])
    head, rule = _target_header(names, subset)
    lines = [
        "| dataset | seed | subnet | role | trained on | val acc | test acc | params "
        "| added FLOPs |" + (f" {head}" if head else ""),
        "|---|---|---|---|---|---|---|---|---|" + rule,
    ]

    def order(r: dict[str, Any]) -> tuple:  # the reported subnet, other ranks, baselines
        role = r.get("role") or ""
        kind = 0 if role == "searched" else 1 if role.startswith("searched") else 2
        return (r["dataset"], r["seed"], kind, r["label"] or "")

    for r in sorted(results["rows"], key=order):
        val = f"{r['val_acc']:.4f}" if r.get("val_acc") is not None else "—"
        # rows of runs made before the split was recorded carry neither field
        fit = f"{r['train_split']} ({r['train_images']:,})" if r.get("train_images") else "—"
        lines.append(
            f"| {r['dataset']} | {r['seed']} | {r['subnet_str']} | {r['role']} | {fit} | {val} "
            f"| {r['test_acc']:.4f} | {r['params']:,} | {r['added_flops']:,} |"
            + (f" {_target_cells(r, names, subset)}" if names else "")
        )
    lines.append("")
    if results["per_dataset"]:
        lines.append(
            "Reported per dataset: the subnet ranked first by validation accuracy, retrained "
            "on the split named under 'trained on' (VTAB-1k and ImageFolder: train+val; "
            "few-shot: the K shots alone) and tested once (mean over seeds)."
        )
    else:
        lines.append(
            "No search in this run: each row is a baseline retrained on the split named under "
            "'trained on' and tested once; `nas report --by-method` compares them."
        )
    lines.append("")
    for ds, acc in sorted(results["per_dataset"].items()):
        lines.append(f"- {ds}: {acc:.4f}")
    for g, acc in sorted(results["group_means"].items()):
        lines.append(f"- group {g}: {acc:.4f}")
    if results["mean_of_groups"] is not None:
        lines.append(f"- mean of group means: {results['mean_of_groups']:.4f}")
        lines.append(f"- flat mean over datasets: {results['flat_mean']:.4f}")
    for ds, accs in sorted(results.get("targets", {}).items()):
        each = ", ".join(f"{t} {a:.4f}" for t, a in accs.items())
        lines.append(f"- {ds} targets: {each}; mean {results['targets_mean'][ds]:.4f}")
    if names:
        lines += ["", TARGETS_NOTE]
    return "\n".join(lines) + "\n"


#: What a report says about its target columns.
TARGETS_NOTE = (
    "Targets (domain generalisation): the retrained model tested once, unchanged, on each "
    "target test set in the source's label space; nothing was chosen on them. A target "
    "holding only some of the source's classes is scored restricted to its own classes "
    "('own classes', the usual protocol for ImageNet-A and -R, and the one its mean uses) "
    "and over all classes ('all classes')."
)


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
    lines += methods_targets_markdown(results["rows"], methods, fmt)
    return "\n".join(lines) + "\n"


def methods_targets_markdown(rows: list[dict[str, Any]], methods: list[str], fmt) -> list[str]:
    """Per source dataset with domain-generalisation targets: the methods as rows, the
    source's test accuracy, a column per target and the targets' mean (each a mean ± sd over
    seeds)."""
    import statistics

    out: list[str] = []
    for ds in sorted({r["dataset"] for r in rows if r.get("targets")}):
        mine = [r for r in rows if r["dataset"] == ds and method_of(r) is not None]
        names, subset = target_columns(mine)
        head, rule = _target_header(names, subset)
        out += ["", f"Domain generalisation, source {ds}:", ""]
        out += [f"| method | {ds} (source test) | " + head, "|---|---|" + rule]
        for m in methods:
            runs = [r for r in mine if method_of(r) == m]
            if not runs:
                continue
            cells = [fmt([r["test_acc"] for r in runs])]
            for n in names:
                cells.append(fmt([r["targets"][n] for r in runs if n in r.get("targets", {})]))
                if n in subset:
                    every = [r.get("targets_all_classes", {}).get(n) for r in runs]
                    cells.append(fmt([v for v in every if v is not None]))
            means = [statistics.mean(r["targets"].values()) for r in runs if r.get("targets")]
            cells.append(fmt(means))
            out.append(f"| {m} | " + " | ".join(cells) + " |")
    if out:
        out += ["", TARGETS_NOTE]
    return out
