"""A run's logged metrics across resumes: ``csv/metrics.csv`` plus the parts earlier sessions wrote.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when it opens a log folder that is not empty, so a
resumed run (``resume=<run>``, ``ckpt_path=last``) would lose every epoch logged before it. Before the
logger opens, :func:`keep_earlier_metrics` moves the file to ``metrics.part<k>.csv``; :func:`read_metrics`
joins the parts and the current file into one history. Lightning offers no append mode, hence this module.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

CURRENT = "metrics.csv"
_PART = re.compile(r"metrics\.part(\d+)\.csv")


def _parts(folder: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in folder.glob("metrics.part*.csv") if (m := _PART.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def keep_earlier_metrics(folder: str | Path) -> Path | None:
    """Move ``folder/metrics.csv`` to the next ``metrics.part<k>.csv``; the new part, or None (nothing logged)."""
    folder = Path(folder)
    current = folder / CURRENT
    if not current.is_file():
        return None
    parts = _parts(folder)
    k = int(_PART.fullmatch(parts[-1].name).group(1)) + 1 if parts else 0
    target = folder / f"metrics.part{k}.csv"
    current.rename(target)
    return target


def read_metrics(folder: str | Path) -> pd.DataFrame:
    """Every logged row of a run in order. A resume repeats the steps after its checkpoint (a mid-epoch
    resume, a validation logged again): rows of an earlier part at or after the next part's first step
    are the ones the later session logged again, so the later rows win."""
    folder = Path(folder)
    files = [*_parts(folder), *([folder / CURRENT] if (folder / CURRENT).is_file() else [])]
    if not files:
        raise FileNotFoundError(f"{folder}: no {CURRENT} (the run logged nothing, or logger=csv was off)")
    tables = [pd.read_csv(f) for f in files]
    kept = []
    for i, t in enumerate(tables):
        later = [n["step"].min() for n in tables[i + 1:] if len(n)]
        kept.append(t[t["step"] < min(later)] if later else t)
    return pd.concat(kept, ignore_index=True)
