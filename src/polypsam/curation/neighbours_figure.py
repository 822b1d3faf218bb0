"""The pairs either side of a near-duplicate threshold, side by side: what a reader checks it against."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from polypsam.data.io import read_image

# measure -> (distance key, match key, flag key, closer is smaller, unit)
MEASURES = {"hash": ("hash_bits", "hash_match", "hash_near_duplicate", True, "bits"),
            "embedding": ("cosine", "embedding_match", "embedding_near_duplicate", False, "cosine")}


def _thumb(path: Path, side: int = 320) -> np.ndarray:
    img = Image.fromarray(read_image(path))
    img.thumbnail((side, side))
    return np.asarray(img)


def threshold_pairs_figure(report: dict, measure: str = "hash", k: int = 6) -> Figure:
    """Rows of (query frame, nearest training frame): the ``k`` flagged pairs furthest apart (just inside
    the threshold), then the ``k`` unflagged pairs closest together (just outside), labelled by distance."""
    dist, match, flag, ascending, unit = MEASURES[measure]
    pairs = sorted((p for p in report["pairs"] if dist in p),
                   key=lambda p: (p[dist] if ascending else -p[dist], p["image"]))
    rows = [p for p in pairs if p[flag]][-k:] + [p for p in pairs if not p[flag]][:k]
    root = Path(report["root"])
    height = 2.3 * max(1, len(rows)) + 0.5
    fig = Figure(figsize=(6.4, height), dpi=80)
    axes = fig.subplots(max(1, len(rows)), 2, squeeze=False)
    for ax_row, p in zip(axes, rows):
        for ax, rel, title in ((ax_row[0], p["image"], f"{p['set']}: {Path(p['image']).name}"),
                               (ax_row[1], p[match], f"train: {Path(p[match]).name}")):
            ax.imshow(_thumb(root / rel))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=8)
        value = f"{p[dist]:g} {unit}"
        ax_row[0].set_ylabel(f"{value}\n{'near-duplicate' if p[flag] else 'not flagged'}", fontsize=8)
    threshold = report["method"]["max_bits" if measure == "hash" else "min_cosine"]
    fig.suptitle(f"nearest training frame by {measure}: either side of {threshold} {unit}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / height))
    return fig
