"""The provenance table of ``python -m polypsam.compare``: what every row's numbers trace back to.

Per row (one evaluation): the resolved config (the training run's ``config_resolved.yaml``, or the
evaluation's own for a zero-shot row), the split file and the sha256 of its image lists
(:func:`polypsam.data.splits.split_digest`: equal for every run on the same images), the checkpoint's sha256
(and that of prompt=auto's separate proposer), the polypsam version, the git commit and hardware of training
and of evaluation (``provenance.json``, :mod:`polypsam.reporting.provenance`), the precision and frozen-encoder
runtime each ran at (the run's ``results.json``, the evaluation's ``meta.json``), and the wall-clock time of
each. Paths, in the Markdown's links and in the CSV, are relative to the folder they are written to, never
absolute; the CSV holds full digests. What a run did not record (a run from before provenance.json existed, a checkpoint
moved away) is ``–``, never guessed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd
import yaml

from polypsam.data.splits import split_digest
from polypsam.download import sha256_file
from polypsam.reporting import provenance
from polypsam.reporting.evaluation_dir import evaluated_bytes
from polypsam.reporting.tables import markdown_table

MISSING = "–"
PATH_COLUMNS = ("config", "split", "checkpoint", "eval_dir")  # the columns of this table that hold paths


def _checkpoint(evaluation: dict) -> Path | None:
    """The evaluated checkpoint: the path in meta.json, else the same file name in the run folder the
    evaluation sits in (a results folder copied elsewhere)."""
    ckpt = evaluation["meta"].get("checkpoint")
    if not ckpt:
        return None
    path = Path(ckpt)
    beside = evaluation["dir"].parent / "checkpoints" / path.name
    return path if path.is_file() else beside if beside.is_file() else path


def _run_dir(evaluation: dict, ckpt: Path | None) -> Path | None:
    """The training run: the folder the evaluation sits in when it is a run folder (a run's eval/, or a
    copy of the run's records), else the checkpoint's run folder."""
    if ckpt is None:
        return None
    here = evaluation["dir"].parent
    if (here / "config_resolved.yaml").is_file() and (here / "split.json").is_file():
        return here
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def _file(path: Path | None) -> Path | None:
    return path if path is not None and path.is_file() else None


def _once(values) -> str | None:
    """The distinct values in order, joined by `` / ``; None when there is none."""
    return " / ".join(dict.fromkeys(v for v in values if v)) or None


def _sessions(sessions: list[dict]) -> dict:
    """Commit(s), version(s) and hardware of the recorded sessions, each listed once."""
    commits = []
    for s in sessions:
        git = s.get("git") or {}
        commits.append(f"{git['commit']}{'+dirty' if git.get('dirty') else ''}" if git.get("commit")
                       else git.get("note") and "not a git checkout")
    hardware = []
    for s in sessions:
        hw = s.get("hardware") or {}
        hardware.append(f"{hw.get('gpus')}x {hw['gpu']}" if hw.get("gpu") else
                        hw.get("cpu") and f"{hw['cpu']} ({hw.get('cpus')} cores)")
    return {"commit": _once(commits), "version": _once(s.get("polypsam_version") for s in sessions),
            "hardware": _once(hardware), "sessions": len(sessions)}


def _results(run: Path | None) -> dict:
    try:
        res = json.loads((run / "results.json").read_text()) if run is not None else {}
    except (OSError, ValueError):
        return {}
    return res if isinstance(res, dict) else {}


def _train_seconds(res: dict) -> float | None:
    """The fit over every session that resumed it where the run recorded them all, else its last session's."""
    fit = res.get("fit_seconds_all_sessions", res.get("fit_seconds"))
    return float(fit) + float(res.get("zero_shot_val_seconds") or 0) if fit is not None else None


def _train_precision(res: dict, config: Path | None) -> str | None:
    """The trainer precision results.json records, else the resolved config's (written after resolution)."""
    if res.get("precision") is not None:
        return str(res["precision"])
    try:
        trainer = (yaml.safe_load(config.read_text()) or {}).get("trainer") or {} if config else {}
    except (OSError, yaml.YAMLError):
        return None
    return None if trainer.get("precision") is None else str(trainer["precision"])


def _train_encoder(res: dict) -> str | None:
    """``<runtime> <precision>`` of the image encoder in training (``PolypSAMModule.encoder_record``): marked
    where it trained, or where the runtime asked for fell back to torch; None before runs recorded it."""
    enc = res.get("encoder")
    if not isinstance(enc, dict) or not enc.get("runtime"):
        return None
    marks = [m for m, on in (("trained", enc.get("trains")), ("fell back", enc.get("fallback"))) if on]
    return f"{enc['runtime']} {enc.get('precision')}" + (f" ({', '.join(marks)})" if marks else "")


def provenance_rows(named_evaluations: list[tuple[str, dict]]) -> pd.DataFrame:
    """A row per (row name, evaluation from :func:`polypsam.reporting.evaluation_dir.load_evaluation`)."""
    # a digest one evaluation recorded also serves another evaluation of the same checkpoint file that
    # predates the record (and whose checkpoint has since moved away)
    recorded = {e["meta"]["checkpoint"]: e["meta"]["checkpoint_sha256"] for _, e in named_evaluations
                if e["meta"].get("checkpoint") and e["meta"].get("checkpoint_sha256")}
    rows = []
    for name, e in named_evaluations:
        ckpt = _checkpoint(e)
        run = _run_dir(e, ckpt)
        config = _file(run / "config_resolved.yaml") if run else _file(e["dir"] / "config_resolved.yaml")
        split = _file(run / "split.json") if run else None
        train, ev = _sessions(provenance.read(run) if run else []), _sessions(provenance.read(e["dir"]))
        res = _results(run)
        rows.append({
            "run": name, "config": config, "split": split, "split_sha256": split and split_digest(split),
            "checkpoint": ckpt,  # the digest recorded, else the file's own
            "checkpoint_sha256": e["meta"].get("checkpoint_sha256") or (_file(ckpt) and sha256_file(ckpt))
            or recorded.get(e["meta"].get("checkpoint")),
            "proposer_sha256": evaluated_bytes(e["dir"], e["meta"])["proposer_sha256"],  # prompt=auto's separate stage 1
            "polypsam_version": _once([train["version"], e["meta"].get("polypsam_version")]),
            "train_commit": train["commit"], "eval_commit": ev["commit"],
            "train_hardware": train["hardware"], "eval_hardware": ev["hardware"],
            "train_sessions": train["sessions"] if run else None,
            "train_seconds_all_sessions": "fit_seconds_all_sessions" in res,
            "train_precision": _train_precision(res, config) if run else None,
            "eval_precision": e["meta"].get("precision"),
            "train_encoder_runtime": _train_encoder(res),
            "eval_encoder_runtime": e["meta"].get("encoder_runtime"),
            "train_seconds": _train_seconds(res),
            "eval_seconds": e["meta"].get("total_seconds", e["meta"].get("wall_seconds")),
            "eval_dir": e["dir"],
        })
    table = pd.DataFrame(rows)
    table["train_sessions"] = table["train_sessions"].astype("Int64")  # a count, empty for zero-shot rows
    return table


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value))


def relative(path, out: str | Path) -> str | None:
    """``path`` relative to the folder ``out`` (with ``..`` where it lies outside), in POSIX form."""
    if _missing(path):
        return None
    return Path(os.path.relpath(Path(path).resolve(), Path(out).resolve())).as_posix()


def with_relative_paths(table: pd.DataFrame, out: str | Path, columns=PATH_COLUMNS) -> pd.DataFrame:
    """``table`` with its path ``columns`` relative to ``out``, as it is written there."""
    return table.assign(**{c: table[c].map(lambda p: relative(p, out)) for c in columns})


def _link(path, out: Path, label: str) -> str:
    return MISSING if _missing(path) else f"[{label}]({relative(path, out)})"


def _short(value, n: int = 12) -> str:
    return MISSING if _missing(value) else str(value)[:n]


def _commit(value) -> str:
    """Commits cut to their first 10 hex digits."""
    return re.sub(r"\b([0-9a-f]{10})[0-9a-f]{30}\b", r"\1", _short(value, 400))


def _duration(seconds, sessions=None, all_sessions=False) -> str:
    if seconds is None or pd.isna(seconds):
        return MISSING
    h, rest = divmod(int(round(float(seconds))), 3600)
    text = f"{h}:{rest // 60:02d}:{rest % 60:02d}"
    if sessions and sessions > 1:
        text += f" ({sessions} sessions)" if all_sessions else " (last session)"
    return text


def provenance_markdown(table: pd.DataFrame, out: str | Path) -> str:
    """The table with links relative to ``out`` (the folder the Markdown is written to)."""
    out = Path(out)
    headers = ["run", "config", "split (sha256 of its lists)", "checkpoint sha256", "polypsam", "commit (train / eval)",
               "hardware (train / eval)", "precision (train / eval)", "encoder runtime (train / eval)",
               "train h:mm:ss", "eval h:mm:ss"]
    rows = []
    for r in table.to_dict("records"):
        split = _link(r["split"], out, "split.json")
        if split != MISSING:
            split += f" `{_short(r['split_sha256'])}`"
        rows.append([
            r["run"], _link(r["config"], out, "config_resolved.yaml"), split,
            (f"`{_short(r['checkpoint_sha256'])}`" if _short(r["checkpoint_sha256"]) != MISSING else
             "checkpoint missing" if _short(r["checkpoint"]) != MISSING else MISSING)
            + (f" (proposer `{_short(r['proposer_sha256'])}`)" if _short(r["proposer_sha256"]) != MISSING else ""),
            _short(r["polypsam_version"], 40), f"{_commit(r['train_commit'])} / {_commit(r['eval_commit'])}",
            f"{_short(r['train_hardware'], 80)} / {_short(r['eval_hardware'], 80)}",
            f"{_short(r['train_precision'])} / {_short(r['eval_precision'])}",
            f"{_short(r['train_encoder_runtime'], 80)} / {_short(r['eval_encoder_runtime'], 80)}",
            _duration(r["train_seconds"], r["train_sessions"], r["train_seconds_all_sessions"]),
            _duration(r["eval_seconds"])])
    return (markdown_table(headers, rows, align=["l"] * 9 + ["r", "r"])
            + "\n\nDigests are the first 12 hex digits (full ones in provenance.csv); a split's digest covers its "
              "train and val lists only, so runs on the same images share it; commits the first 10, "
              "`+dirty`: tracked files differed from the commit. `–`: not recorded by that run.\n")
