"""What a run's results.json keeps across a resume, and the line of a failure after fit.

The zero-shot validation runs once, before the first fit: its fields are written to ``zero_shot.json`` at
once (a run killed or stopped later has no results.json yet), and a resumed run, which skips it, takes
them from there (or from an older run's results.json). A failure after fit (the evaluation after
training) keeps the trained checkpoints: its line names them and the ``resume=`` that finishes the run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from polypsam.cli import one_line
from polypsam.errors import PolypSamError
from polypsam.training.checkpoints import LAST_NAME

log = logging.getLogger(__name__)

ZERO_SHOT_FILE = "zero_shot.json"
ZERO_SHOT_KEYS = ("zero_shot_val_dice", "zero_shot_val_iou", "zero_shot_val_seconds")


def save_zero_shot(out: Path, results: dict) -> None:
    """The zero-shot fields of ``results``, beside the run's other files (global rank 0 calls it)."""
    (out / ZERO_SHOT_FILE).write_text(json.dumps({k: results.get(k) for k in ZERO_SHOT_KEYS}, indent=1))


def earlier_zero_shot(out: Path) -> dict:
    """The zero-shot fields the run recorded before it was resumed; empty when it never validated zero-shot."""
    for name in (ZERO_SHOT_FILE, "results.json"):
        try:
            found = json.loads((out / name).read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable (%s); its zero-shot fields are not kept", out / name, exc)
            continue
        kept = {k: found[k] for k in ZERO_SHOT_KEYS if isinstance(found, dict) and found.get(k) is not None}
        if kept:
            return kept
    return {}


def after_fit_error(exc: PolypSamError, out: Path, best: str) -> PolypSamError:
    """``exc`` (same class) with its line saying that training is saved and how to finish the run."""
    saved = [str(p) for p in (Path(best) if best else None, out / "checkpoints" / LAST_NAME)
             if p is not None and p.is_file()]
    line = (f"{one_line(exc).rstrip('.')}. Training finished and its checkpoints are saved ({', '.join(saved)}): "
            f"fix this, then python -m polypsam.train resume={out} (a value override may follow, e.g. "
            "model.runtime=torch) evaluates without training again.")
    try:
        return type(exc)(line)
    except TypeError:  # a class with other arguments
        return PolypSamError(line)
