"""The study report: README.md of a results folder, from the rows' copied records and the comparisons.

Every number here is read from a row's ``eval*/summary.csv``, ``per_image.csv`` or ``detection.csv``
(copied beside the report with the run's ``config_resolved.yaml``, ``split.json`` and provenance), and
``provenance.md`` (``python -m polypsam.compare``) traces each row to its checkpoint's sha256, commit,
hardware and wall-clock time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from polypsam.reporting import tables as rep

NEGLIGIBLE = 0.005  # a mean Dice difference under this is read as none, whatever its interval


@dataclass
class RowResult:
    name: str
    label: str
    eval_dir: Path  # relative to the report folder
    summary: pd.DataFrame
    per_image: pd.DataFrame
    detection: pd.DataFrame | None = None


def _ci(r: dict, key: str = "dice") -> str:
    return f"{r[key]:.3f} [{r[f'{key}_ci_low']:.3f}, {r[f'{key}_ci_high']:.3f}]"


def headline(rows: list[RowResult], sets: list[str]) -> str:
    headers = ["row"] + [f"{rep.SHORT_NAMES.get(s, s)} Dice@0.5 [95% CI]" for s in sets] + \
        [f"{rep.SHORT_NAMES.get(s, s)} mDice" for s in sets] + ["records"]
    body = []
    for r in rows:
        by = rep.summary_rows_by_set(r.summary)
        body.append([r.label] + [_ci(by[s]) if s in by else "–" for s in sets]
                    + [rep.fmt(by[s]["mean_dice"]) if s in by else "–" for s in sets]
                    + [f"[{r.name}]({r.eval_dir.as_posix()}/summary.md)"])
    return rep.markdown_table(headers, body)


def paired_markdown(comparisons: list[tuple[str, str, str, pd.DataFrame]], spread: pd.DataFrame | None,
                    runs: dict[str, str | None] | None = None) -> str:
    """(what it asks, row a, row b, paired_comparison table) -> one Markdown table with a verdict column.

    ``runs`` names the training run behind each row (None: zero-shot). A difference smaller than the seed
    spread reads as noise only between rows of different runs, one of them trained: two zero-shot rows have
    no seed to vary, and two evaluations of one checkpoint differ by inference alone. ``runs=None``: the
    rule applies to every comparison.
    """
    sd = {} if spread is None else {r["dataset"]: r for r in spread.to_dict("records")}

    def seed_dependent(a: str, b: str) -> bool:
        return runs is None or (runs.get(a) != runs.get(b) and (runs.get(a) or runs.get(b)) is not None)

    body = []
    for question, a, b, table in comparisons:
        for r in table.to_dict("records"):
            s = sd.get(r["dataset"]) if seed_dependent(a, b) else None
            noise = s is not None and s["sd"] is not None and abs(r["diff"]) < (s["max"] - s["min"])
            covers = r["ci_low"] <= 0 <= r["ci_high"]
            verdict = ("noise (smaller than the seed spread)" if noise else
                       "not distinguishable (interval covers 0)" if covers else
                       f"no practical difference (under {NEGLIGIBLE})" if abs(r["diff"]) < NEGLIGIBLE else
                       f"{a if r['diff'] > 0 else b} higher")
            if verdict.endswith("higher") and r["wilcoxon_p"] is not None and r["wilcoxon_p"] >= 0.05:
                verdict += " (bootstrap only: Wilcoxon p >= 0.05)"
            p = "–" if r["wilcoxon_p"] is None else f"{r['wilcoxon_p']:.2g}"
            body.append([question, rep.SHORT_NAMES.get(r["dataset"], r["dataset"]), str(r["n_images"]),
                         f"{r['mean_a']:.3f}", f"{r['mean_b']:.3f}",
                         f"{r['diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]", p, verdict])
    return rep.markdown_table(["comparison (a vs b)", "set", "images", "a", "b", "a - b [95% paired bootstrap]",
                               "Wilcoxon p", "reading"], body)


def spread_markdown(spread: pd.DataFrame) -> str:
    body = [[rep.SHORT_NAMES.get(r["dataset"], r["dataset"]), str(r["seeds"]), f"{r['mean']:.3f}",
             "–" if r["sd"] is None else f"{r['sd']:.3f}", f"{r['min']:.3f} – {r['max']:.3f}"]
            for r in spread.to_dict("records")]
    return rep.markdown_table(["set", "seeds", "mean Dice", "sd", "range"], body)


def subset_markdown(tables: list[tuple[str, pd.DataFrame]], inside: str, outside: str) -> str:
    """(row label, :func:`polypsam.reporting.study.subset_means` table) -> a row per row, two columns per set that has
    images in the subset: the mean over them and over the others, with their counts in the header."""
    first = tables[0][1].to_dict("records")
    sets = [(r["dataset"], r["n_in"], r["n_out"]) for r in first if r["n_in"]]
    headers = ["row"] + [h for s, n_in, n_out in sets for h in
                         (f"{rep.SHORT_NAMES.get(s, s)}, {inside} ({n_in})",
                          f"{rep.SHORT_NAMES.get(s, s)}, {outside} ({n_out})")]
    body = []
    for label, table in tables:
        by = {r["dataset"]: r for r in table.to_dict("records")}
        body.append([label] + [rep.fmt(by[s][k]) if s in by and pd.notna(by[s][k]) else "–"
                               for s, _, _ in sets for k in ("mean_in", "mean_out")])
    return rep.markdown_table(headers, body)


def detection_markdown(det: pd.DataFrame) -> str:
    cols = ["frames", "with_polyp", "proposals", "missed", "false_proposals", "correct_rejections", "false_alarms"]
    return rep.markdown_table(["set", *[c.replace("_", " ") for c in cols]],
                              [[rep.SHORT_NAMES.get(r["dataset"], r["dataset"]), *[str(r[c]) for c in cols]]
                               for r in det.to_dict("records")])


def errata_markdown(before: pd.DataFrame, after: dict[str, pd.DataFrame], labels: dict[str, str]) -> str:
    """Old against new per-image Dice@0.5 of each row a defect invalidated; ``before``: the old records
    (row, dataset, dice, best_val_dice, epochs, train_commit), ``after``: the rerun rows' summary tables."""
    headers = ["row", "set", "old Dice@0.5", "new Dice@0.5", "new - old", "old best val Dice (epochs)",
               "old commit"]
    body = []
    for r in before.to_dict("records"):
        new = after.get(r["row"])
        by = rep.summary_rows_by_set(new) if new is not None else {}
        d = by.get(r["dataset"], {}).get("dice")
        body.append([labels.get(r["row"], r["row"]), rep.SHORT_NAMES.get(r["dataset"], r["dataset"]),
                     f"{r['dice']:.3f}", "rerun pending" if d is None else f"{d:.3f}",
                     "–" if d is None else f"{d - r['dice']:+.3f}",
                     f"{r['best_val_dice']:.3f} ({r['epochs']})", f"`{r['train_commit']}`"])
    return rep.markdown_table(headers, body)
