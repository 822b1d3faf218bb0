"""Merging evaluations into one comparison table (the library half of ``python -m polypsam.compare``).

:func:`compare` makes a row per evaluation (backbone x strategy x split x prompt) with the test sets as
columns, DSC / mIoU sub-columns; :func:`to_markdown` writes it as the paper's tables are laid out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from polypsam.cli import one_line
from polypsam.errors import ConfigError, DataError, PolypSamError
from polypsam.reporting import tables as rep
from polypsam.reporting.evaluation_dir import load_evaluation


def compare(paths: Sequence[str | Path], metric: str = "dice", names: Sequence[str] | None = None) -> pd.DataFrame:
    """A row per evaluation: identity columns, then ``<set> DSC`` / ``<set> mIoU``, the mean over sets.

    ``names``: the ``run`` column, one per path (default: the run folder's name)."""
    if metric not in rep.PAIRS:
        raise ConfigError(f"--metric {metric!r}: choose one of {', '.join(rep.PAIRS)}.")
    if not paths:
        raise ConfigError("give at least one run or evaluation directory.")
    if names is not None and len(names) != len(paths):
        raise ConfigError(f"--names gives {len(names)} names for {len(paths)} directories; give one per directory.")
    dkey, ikey = rep.PAIRS[metric]
    evals = [load(p) for p in paths]
    sets = rep.ordered_sets([s for e in evals for s in e["summary"]["dataset"].astype(str)])
    rows = []
    for i, e in enumerate(evals):
        m = e["meta"]
        by = rep.summary_rows_by_set(e["summary"])
        default = e["dir"].parent.name if e["dir"].name == "eval" else e["dir"].name
        row = {"run": names[i] if names is not None else default,
               "backbone": m.get("model"), "strategy": m.get("strategy"), "split": m.get("split"),
               "prompt": m.get("prompt", {}).get("label") or m.get("prompt", {}).get("mode"), "images": m.get("n_images"),
               "unreadable": m.get("n_unreadable")}
        for s in sets:
            row[f"{s} DSC"] = by[s][dkey] if s in by else None
            row[f"{s} mIoU"] = by[s][ikey] if s in by else None
        vals = [by[s][dkey] for s in sets if s in by]
        row["mean DSC"] = sum(vals) / len(vals) if vals else None
        row["eval_dir"] = str(e["dir"])
        rows.append(row)
    return pd.DataFrame(rows)


def load(path: str | Path) -> dict:
    try:
        return load_evaluation(path)
    except PolypSamError:
        raise
    except (OSError, ValueError) as exc:  # an unreadable or malformed summary.csv / meta.json
        raise DataError(f"{path}: cannot read the evaluation ({type(exc).__name__}: {one_line(exc)}).") from None


def to_markdown(table: pd.DataFrame, metric: str = "dice") -> str:
    sets = [c[: -len(" DSC")] for c in table.columns if c.endswith(" DSC") and c != "mean DSC"]
    ident = ["run", "backbone", "strategy", "split", "prompt"]
    headers = ident + [h for s in sets for h in (rep.SHORT_NAMES.get(s, s), "")] + ["mean DSC"]
    sub = [""] * len(ident) + ["DSC", "mIoU"] * len(sets) + [""]
    rows = [sub]
    for r in table.to_dict("records"):
        cells = [str(r[c]) for c in ident]
        for s in sets:
            cells += ["–" if pd.isna(r[k]) else rep.fmt(r[k]) for k in (f"{s} DSC", f"{s} mIoU")]
        rows.append(cells + [rep.fmt(r["mean DSC"])])
    note = {"dice": "per-image Dice/IoU at threshold 0.5", "mean_dice": "toolbox mDice/mIoU (256 thresholds)",
            "row_dice": "Polyp-SAM compatibility: MONAI per-row Dice/IoU"}[metric]
    return (markdown_table_with_align(headers, rows, len(ident))
            + f"\n\nMetric: {note}; mean over images of each set. `–`: set not evaluated in that run.\n")


def markdown_table_with_align(headers, rows, n_left: int) -> str:
    return rep.markdown_table(headers, rows, align=["l"] * n_left + ["r"] * (len(headers) - n_left))
