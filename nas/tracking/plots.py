"""Plots of a search, written as PNG files (and logged to MLflow by the pipeline):
accuracy against trainable parameters with the Pareto front, best and mean accuracy per
round, and the winning subnet drawn layer by layer."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

# matplotlib keeps its font cache in MPLCONFIGDIR, by default under ~/.cache (or ~/.matplotlib):
# not behind the user's back in the home folder; in the temporary folder unless they chose one.
os.environ.setdefault(
    "MPLCONFIGDIR", str(Path(tempfile.gettempdir()) / f"nas-matplotlib-{os.getuid()}")
)
import matplotlib  # after MPLCONFIGDIR, which it reads on import

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from nas.modules.spaces import LayeredSpace
from nas.search.base import Evaluated, pareto_front
from nas.space.search_space import SearchSpace
from nas.space.subnet import Subnet


def plot_search(
    history: Sequence[Evaluated],
    space: SearchSpace,
    winner: Subnet,
    out: Path,
    title: str,
    cost_label: str = "trainable parameters",
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(
        [e.cost for e in history], [e.score for e in history], s=12, alpha=0.6, label="candidates"
    )
    front = pareto_front(history)
    ax.step(
        [e.cost for e in front],
        [e.score for e in front],
        where="post",
        color="C3",
        label="Pareto front",
    )
    ax.set_xlabel(cost_label)
    ax.set_ylabel("validation accuracy (inherited weights)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    paths.append(out / "accuracy_vs_cost.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    rounds = sorted({e.round for e in history})
    best, mean, so_far = [], [], 0.0
    for r in rounds:
        scores = [e.score for e in history if e.round == r]
        so_far = max(so_far, *scores)
        best.append(so_far)
        mean.append(sum(scores) / len(scores))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, best, marker="o", label="best so far")
    ax.plot(rounds, mean, marker="s", label="mean of the round")
    ax.set_xticks(rounds)
    ax.set_xlabel("round (generation)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    paths.append(out / "accuracy_per_round.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    depth = space.geometry.depth
    kinds = [k for k in space.modules if isinstance(space.modules[k], LayeredSpace)]
    fig, ax = plt.subplots(figsize=(6, 1 + 0.6 * len(kinds)))
    width = 0.8 / max(1, len(kinds))
    for i, kind in enumerate(kinds):
        dims = list(winner[kind]) + [0] * (depth - len(winner[kind]))
        ax.bar([layer + i * width for layer in range(depth)], dims, width=width, label=kind)
    ax.set_xticks([layer + 0.4 - width / 2 for layer in range(depth)])
    ax.set_xticklabels([str(layer) for layer in range(depth)])
    ax.set_xlabel("layer")
    ax.set_ylabel("dim (tokens / rank / width)")
    ax.set_title(f"winner: {winner}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "winner_layers.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
