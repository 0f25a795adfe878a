"""The methods table: per dataset the mean and standard deviation over seeds, group means,
and costs, from the rows a run (or its MLflow store) holds."""

from __future__ import annotations

from nas.pipeline.reports import methods_markdown, results_markdown, summarise


def row(dataset, group, seed, label, role, acc, params, flops=0):
    return {
        "dataset": dataset,
        "group": group,
        "seed": seed,
        "label": label,
        "role": role,
        "test_acc": acc,
        "params": params,
        "added_flops": flops,
        "subnet_str": "",
        "val_acc": None,
    }


def test_methods_table():
    rows = [
        row("digits", "natural", 0, "rank1", "searched", 0.90, 1000, 2_000_000),
        row("digits", "natural", 1, "rank1", "searched", 0.94, 3000, 4_000_000),
        row("digits", "natural", 0, "rank2", "searched (not reported)", 0.99, 5000),
        row("digits", "natural", 0, "baseline-lora", "baseline", 0.80, 2000),
        row("digits", "natural", 1, "baseline-lora", "baseline", 0.84, 2000),
        row("dsprites_loc", "structured", 0, "rank1", "searched", 0.50, 2000, 3_000_000),
        row("dsprites_loc", "structured", 0, "baseline-lora", "baseline", 0.70, 2000),
    ]
    text = methods_markdown(summarise(rows))
    lines = text.splitlines()
    assert lines[0] == "| dataset | group | searched | lora |"
    # mean ± sample standard deviation over the two seeds; rank2 is never reported
    assert lines[2] == "| digits | natural | 92.0 ± 2.8 | 82.0 ± 2.8 |"
    assert lines[3] == "| dsprites_loc | structured | 50.0 | 70.0 |"
    assert "| **group natural** | | 92.0 | 82.0 |" in lines
    assert "| **mean of group means** | | 71.0 | 76.0 |" in lines
    assert "| **flat mean** | | 71.0 | 76.0 |" in lines
    assert "| **trainable params (mean)** | | 2,000 | 2,000 |" in lines
    assert "| **added MFLOPs (mean)** | | 3.00 | 0.00 |" in lines


def test_results_table_lists_the_searched_subnet_first_and_speaks_only_of_what_ran():
    rows = [
        row("digits", "natural", 0, "baseline-adapter", "baseline", 0.80, 2000),
        row("digits", "natural", 0, "rank2", "searched (not reported)", 0.99, 5000),
        row("digits", "natural", 0, "rank1", "searched", 0.90, 1000),
    ]
    for r in rows:
        r["subnet_str"] = r["label"]
    lines = results_markdown(summarise(rows)).splitlines()
    listed = [line.split(" | ")[2] for line in lines if line.startswith("| digits")]
    assert listed == ["rank1", "rank2", "baseline-adapter"]
    assert any(line.startswith("Reported per dataset: the subnet ranked first") for line in lines)

    baselines = [r for r in rows if r["role"] == "baseline"]
    text = results_markdown(summarise(baselines))
    assert "ranked first" not in text and "No search in this run" in text
