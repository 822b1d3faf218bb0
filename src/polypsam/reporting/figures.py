"""Figures of an evaluation: prompt robustness, best / median / worst cases, the worst images over all sets.

Figures are built on matplotlib.figure.Figure, not pyplot: no global state, no backend switch (a notebook
keeps its inline backend, a headless run needs no display), nothing to close.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from polypsam.data.io import read_image, read_mask
from polypsam.reporting.drawing import overlay
from polypsam.reporting.tables import METRIC_LABELS, SHORT_NAMES, ordered_sets


def figure_png(fig, dpi: int | None = None) -> bytes:
    """PNG bytes of a figure (for notebooks: IPython.display.Image(figure_png(fig)))."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def robustness_figure(robust: pd.DataFrame, references: dict[str, dict[str, float]] | None = None):
    """Dice against box noise per set; ``references`` ({row: {set: dice}}, e.g. ``auto``) are drawn as
    horizontal lines in each set's colour: the noise a human box may have before that row wins."""
    fig = Figure(figsize=(5.5, 3.8), dpi=110)
    ax = fig.subplots()
    styles = iter(["--", ":", "-."])
    refs = {row: (next(styles, "--"), vals) for row, vals in (references or {}).items()}
    for s in ordered_sets(robust["dataset"].astype(str).unique()):
        d = robust[robust["dataset"].astype(str) == s].sort_values("noise")
        x = d["noise"].to_numpy(float) * 100
        (line,) = ax.plot(x, d["dice"], marker="o", label=SHORT_NAMES.get(s, s))
        ax.fill_between(x, d["dice_ci_low"], d["dice_ci_high"], alpha=0.15)
        for row, (style, vals) in refs.items():
            if s in vals:
                ax.axhline(vals[s], color=line.get_color(), linestyle=style, linewidth=1.2,
                           label=f"{SHORT_NAMES.get(s, s)}: {row}")
    ax.set_xlabel("box noise: each side moved by up to this % of the box side")
    ax.set_ylabel("mean per-image Dice")
    ax.set_title("Prompt robustness")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def cases_figure(cases: Sequence[dict], title: str):
    """Rows of (image + box, ground truth, prediction + box); each case: image, gt, pred, boxes, label."""
    n = max(1, len(cases))
    fig = Figure(figsize=(10, 3.2 * n), dpi=100)
    axes = fig.subplots(n, 3, squeeze=False)
    for row, case in zip(axes, cases):
        img, gt, pred, boxes = case["image"], case["gt"], case["pred"], case.get("boxes")
        empty = np.zeros_like(gt, dtype=bool)
        panels = [(overlay(img, empty, empty, boxes), "image + box prompt"),
                  (overlay(img, gt, empty), "ground truth (green)"),
                  (overlay(img, gt, pred, boxes), "prediction (red) + box")]
        for ax, (im, sub) in zip(row, panels):
            ax.imshow(im)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(sub, fontsize=8)
        row[0].set_ylabel(case["label"], fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def pick_cases(per_image: pd.DataFrame, metric: str = "dice") -> list[tuple[str, dict]]:
    """Best, median and worst readable image by ``metric`` (fewer when the set is smaller)."""
    ok = per_image[per_image["status"] == "ok"].sort_values([metric, "image"], ascending=[False, True])
    if ok.empty:
        return []
    recs = ok.to_dict("records")
    picks = [("best", recs[0]), ("median", recs[len(recs) // 2]), ("worst", recs[-1])]
    seen, out = set(), []
    for tag, r in picks:
        if r["image"] not in seen:
            seen.add(r["image"])
            out.append((tag, r))
    return out


def parse_boxes(text) -> np.ndarray:
    if not isinstance(text, str) or not text.strip():
        return np.zeros((0, 4), np.float32)
    return np.array([[float(v) for v in b.split(",")] for b in text.split(";")], np.float32)


def worst_cases_figure(evaluation: dict, n: int = 6, metric: str = "dice"):
    """The n lowest-scoring readable images over all sets, from the saved masks (save_masks=true)."""
    d, per = evaluation["dir"], evaluation["per_image"]
    ok = per[(per["status"] == "ok") & per["pred_mask"].notna()].sort_values(metric).head(n)
    cases = []
    for r in ok.to_dict("records"):
        cases.append({"image": read_image(r["image_path"]), "gt": read_mask(r["mask_path"]),
                      "pred": read_mask(d / r["pred_mask"]), "boxes": parse_boxes(r["box"]),
                      "label": f"{r['dataset']}/{r['image']}\n{METRIC_LABELS.get(metric, metric)} "
                               f"{r[metric]:.3f}"})
    return cases_figure(cases, f"{len(cases)} worst images by {METRIC_LABELS.get(metric, metric)}")


__all__ = ["cases_figure", "figure_png", "parse_boxes", "pick_cases", "robustness_figure", "worst_cases_figure"]
