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


def evaluated_bytes(path: str | Path, meta: dict | None = None) -> dict[str, str | None]:
    """The sha256 of what an evaluation read: ``checkpoint_sha256`` (None: zero-shot, or not recorded) and
    ``proposer_sha256``, prompt=auto's separate stage 1 (meta.json's, else the identity of the settings file
    the evaluation read, for evaluations that predate the record; None: no proposer, or not recorded).
    ``meta``: its meta.json when the caller has read it already."""
    d = find_eval_dir(path)
    meta = meta if meta is not None else json.loads((d / "meta.json").read_text())
    proposer = meta.get("proposer_sha256")
    settings = (meta.get("auto_settings") or {}).get("file")
    if proposer is None and (meta.get("prompt") or {}).get("proposer") and settings:
        for f in (d / Path(settings).name, Path(settings)):  # its copy beside the records, or where it was chosen
            if f.is_file():
                proposer = (json.loads(f.read_text()).get("identity") or {}).get("proposer_sha256")
                break
    return {"checkpoint_sha256": meta.get("checkpoint_sha256"), "proposer_sha256": proposer}


__all__ = ["evaluated_bytes", "find_eval_dir", "load_evaluation"]
