"""Recall against budget, per layer: which layers lose what under each rule.

One small panel per layer; x is the budget as a share of the stream, y the attention
recall (the share of the probes' own attention, at their answer positions, on the tokens
the rule would still hold). The oracle is the best keep set at that budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np

from hermes_policy.fileio.atomic import atomic_path
from hermes_policy.policy import Policy

from .calibrate import RECALL_RULES, StreamRecord, rule_recall

mpl.use("Agg")

STYLE = {
    "fifo": ("#1f77b4", "-"),
    "sink-recent": ("#17becf", ":"),
    "attention-only": ("#d62728", "-"),
    "oracle": ("#000000", "--"),
}
POLICY_COLOURS = ("#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


def recall_curves(records: Sequence[StreamRecord], shares: Sequence[float],
                  policies: dict[str, Policy]) -> dict[str, np.ndarray]:
    """Per entrant, recall ``(len(shares), layers)`` averaged over ``records``."""
    names = [*RECALL_RULES, *[f"hermes ({n})" for n in policies], "oracle"]
    out = {}
    for name in names:
        rows = []
        for share in shares:
            per = []
            for record in records:
                budget = max(1, int(round(share * record.length)))
                if name.startswith("hermes ("):
                    per.append(rule_recall(record, "hermes", budget, policies[name[8:-1]]))
                else:
                    per.append(rule_recall(record, name, budget))
            rows.append(np.mean(per, axis=0))
        out[name] = np.array(rows)
    return out


def plot_recall_curves(curves: dict[str, np.ndarray], shares: Sequence[float], path: str | Path,
                       title: str = "") -> Path:
    """Draw :func:`recall_curves` (one panel per layer) to ``path`` (png)."""
    import matplotlib.pyplot as plt

    layers = next(iter(curves.values())).shape[1]
    cols = 6
    rows = -(-layers // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 1.9 * rows), sharex=True, sharey=True)
    axes = np.atleast_1d(axes).ravel()
    colours: dict[str, Any] = {}
    for i, name in enumerate(n for n in curves if n.startswith("hermes (")):
        colours[name] = (POLICY_COLOURS[i % len(POLICY_COLOURS)], "-")
    x = np.asarray(shares)
    for layer in range(layers):
        ax = axes[layer]
        for name, values in curves.items():
            colour, dash = STYLE.get(name) or colours[name]
            ax.plot(x, values[:, layer], dash, color=colour, lw=1.2, label=name if layer == 0 else None)
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
    for ax in axes[layers:]:
        ax.axis("off")
    fig.supxlabel("budget (share of the stream)", fontsize=9)
    fig.supylabel("attention recall", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.965), ncol=min(7, len(curves)), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, y=0.995, fontsize=10)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
