"""The study's figures: validation Dice per epoch of every trained row, and prompt robustness of every row."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from polypsam.reporting import tables as rep


def validation_curves(metrics: dict[str, pd.DataFrame]) -> Figure:
    """Validation Dice against epochs completed (0: before training, the zero-shot value), one line per row;
    ``metrics``: each row's logged history (``polypsam.training.run_metrics.read_metrics``)."""
    fig = Figure(figsize=(6.4, 4.0), dpi=110)
    ax = fig.subplots()
    for name, m in metrics.items():
        v = m[m["val/dice"].notna()][["epoch", "step", "val/dice"]]
        if v.empty:
            continue
        # the first validation (step 0) is before training; each later one ends epoch `epoch`
        x = [0 if s == 0 else int(e) + 1 for e, s in zip(v["epoch"], v["step"])]
        ax.plot(x, v["val/dice"], marker="o", label=name)
    ax.set_xlabel("epochs trained (0: before training)")
    ax.set_ylabel("validation Dice (per image, original size)")
    ax.set_title("Validation Dice per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def robustness_all(curves: dict[str, pd.DataFrame], levels: dict[str, pd.DataFrame]) -> Figure:
    """One panel per test set: Dice against box noise for the box-prompted rows (``robustness.csv``), and
    each row that needs no box (``summary.csv``) as a horizontal line."""
    sets = rep.ordered_sets([s for df in [*curves.values(), *levels.values()] for s in df["dataset"].astype(str)])
    fig = Figure(figsize=(5.2 * len(sets), 4.0), dpi=110)
    axes = fig.subplots(1, len(sets), squeeze=False)[0]
    for ax, s in zip(axes, sets):
        for name, df in curves.items():
            d = df[df["dataset"].astype(str) == s].sort_values("noise")
            ax.plot(d["noise"] * 100, d["dice"], marker="o", label=name)
        for style, (name, df) in zip(["--", ":", "-.", (0, (5, 1))], levels.items()):
            d = df[df["dataset"].astype(str) == s]
            if len(d):
                ax.axhline(float(d["dice"].iloc[0]), color="k", linestyle=style, linewidth=1.1, label=f"{name} (no box)")
        ax.set_title(rep.SHORT_NAMES.get(s, s))
        ax.set_xlabel("box noise: each side moved by up to this % of its side")
        ax.set_ylabel("mean per-image Dice")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    return fig
