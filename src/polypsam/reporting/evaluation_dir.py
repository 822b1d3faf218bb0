"""An evaluation directory as ``polypsam.evaluate`` writes it, read back as tables."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from polypsam.errors import DataError


def find_eval_dir(path: str | Path) -> Path:
    """An evaluation directory: the folder holding summary.csv, or a training run's ``eval/``."""
    p = Path(path).expanduser()
    for cand in (p, p / "eval"):
        if (cand / "summary.csv").is_file() and (cand / "meta.json").is_file():
            return cand
    raise DataError(f"{p}: no evaluation found (looked for summary.csv and meta.json here and in "
                    f"{p / 'eval'}); run python -m polypsam.evaluate first, or pass the folder it wrote.")


def load_evaluation(path: str | Path) -> dict:
    """meta, summary, per_image and robustness tables of an evaluation directory."""
    d = find_eval_dir(path)
    out = {"dir": d, "meta": json.loads((d / "meta.json").read_text()),
           "summary": pd.read_csv(d / "summary.csv"), "per_image": pd.read_csv(d / "per_image.csv")}
    rob = d / "robustness.csv"
    out["robustness"] = pd.read_csv(rob) if rob.is_file() else None
    return out


__all__ = ["find_eval_dir", "load_evaluation"]
