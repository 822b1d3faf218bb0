"""What the CPU study keeps of a row, and whether it is current.

A row's records (its evaluation's small files, its run's config, split and results) are copied beside the
report, so that the report holds rows run in other sessions. An evaluation, a settings file chosen by
select_auto or a row's records is current when it read the bytes the runs folder holds now: the row's
checkpoint and prompt=auto's proposer (their sha256). One that read others (a checkpoint retrained since) is
stale: the driver runs it again, and sets the stale one aside under a new name instead of deleting it.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

from lite_cpu_rows import Row, proposer_ckpt
from PIL import Image

from polypsam.download import sha256_file
from polypsam.reporting.evaluation_dir import evaluated_bytes


def current_bytes(study, row: Row) -> dict[str, str]:
    """The sha256 of what ``row`` reads in the runs folder now: its job's best.ckpt (``checkpoint_sha256``) and
    its proposer's (``proposer_sha256``); a file the runs folder lacks is left out (nothing to compare)."""
    files = {"checkpoint_sha256": study.run_dir(row.job) / "checkpoints" / "best.ckpt" if row.job else None,
             "proposer_sha256": proposer_ckpt(row, study.runs)}
    return {key: sha256_file(f) for key, f in files.items() if f is not None and f.is_file()}


def stale(path: Path, now: dict[str, str]) -> str | None:
    """Why the evaluation folder or settings file ``path`` is not of the bytes ``now`` (None: it is, or there is
    nothing to compare)."""
    if path.is_dir():
        if not (path / "summary.csv").is_file():
            return None
        read = evaluated_bytes(path)
    elif path.is_file():  # select_auto's settings: their identity names the bytes they were chosen for
        read = json.loads(path.read_text()).get("identity") or {}
    else:
        return None
    for key, sha in now.items():
        if read.get(key) != sha:
            what = key.removesuffix("_sha256")
            was = f"sha256 {read[key][:12]}" if read.get(key) else "bytes not recorded"
            return f"{path} read a {what} ({was}) other than the runs folder's ({sha[:12]})"
    return None


def set_aside(path: Path, why: str) -> None:
    """Rename ``path`` to ``<name>.stale-<UTC time>`` (kept, never deleted; the report does not read it)."""
    if path.exists():
        to = path.with_name(f"{path.name}.stale-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}")
        path.rename(to)
        print(f"[lite_cpu] {why}: set aside as {to.name}", flush=True)


def copy_records(study, row: Row) -> Path | None:
    """The row's small records beside the report (no checkpoint: its sha256 is in meta.json); the records
    already there when the run folder is not in ``runs``; None when the row has not finished."""
    src, dst = study.eval_dir(row), study.out / "rows" / row.name
    if not (src / "summary.csv").is_file():
        return study.record_dir(row) if (study.record_dir(row) / "summary.csv").is_file() else None
    if dst.exists():
        shutil.rmtree(dst)
    ev = dst / row.eval_dir if row.job else dst
    ev.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix in (".csv", ".json", ".md", ".yaml"):
            shutil.copy(f, ev / f.name)
    if row.select and (chosen := study.settings_file(row)).is_file():  # read by the evaluation, chosen on validation
        shutil.copy(chosen, ev / chosen.name)
    # the best/median/worst figures show real frames: they stay in the run folder, never in the repository
    for f in sorted(src.glob("robustness.png")):
        (ev / "figures").mkdir(exist_ok=True)
        im = Image.open(f).convert("RGB")
        im.thumbnail((1100, 1100))
        im.save(ev / "figures" / f"{f.stem}.jpg", quality=80)
    if row.job:
        run = study.run_dir(row.job)
        for name in ("config_resolved.yaml", "split.json", "results.json", "provenance.json", "data_report.json"):
            if (run / name).is_file():
                shutil.copy(run / name, dst / name)
        for part in sorted((run / "csv").glob("metrics*.csv")):  # metrics.csv and the parts of earlier sessions
            (dst / "csv").mkdir(exist_ok=True)
            shutil.copy(part, dst / "csv" / part.name)
    return ev
