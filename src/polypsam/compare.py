"""``python -m polypsam.compare <run or eval dir>... [--out DIR] [--metric dice|mean_dice|row_dice]``.

Merges evaluations into one table, a row per run (backbone x strategy x split x prompt) and the test sets as
columns with DSC / mIoU sub-columns, written as Markdown and CSV. This is how the paper's Tables 1 to 3 come
out of a sweep: Table 1 (backbone x strategy) and Table 3 (training data) are rows of the same table.
With --out, provenance.md and provenance.csv trace every row to its config, split, checkpoint, version,
commit, hardware, precision, encoder runtime and wall-clock time (polypsam.reporting.provenance_table); the paths
written (table.csv's eval_dir too) are relative to the --out folder.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from polypsam.cli import one_line, run_cli
from polypsam.errors import ConfigError, DataError, PolypSamError
from polypsam.reporting import tables as rep
from polypsam.reporting.provenance_table import provenance_markdown, provenance_rows, with_relative_paths


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
    evals = [_load(p) for p in paths]
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


def _load(path: str | Path) -> dict:
    try:
        return rep.load_evaluation(path)
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


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m polypsam.compare", description=__doc__.split("\n\n")[1])
    ap.add_argument("runs", nargs="+", help="training run directories (with eval/) or evaluation directories")
    ap.add_argument("--out", help="folder for table.md/.csv and provenance.md/.csv (default: print the table)")
    ap.add_argument("--names", help="comma-separated row names, one per directory (default: run folder names)")
    ap.add_argument("--metric", default="dice", choices=sorted(rep.PAIRS),
                    help="dice: per-image @0.5 (default); mean_dice: toolbox; row_dice: Polyp-SAM compat")
    args = ap.parse_args(argv)
    return run_cli(_write, args, return_code=True)  # a failure: one line on stderr, status 2 (polypsam.cli)


def _write(args: argparse.Namespace) -> int:
    table = compare(args.runs, args.metric, args.names.split(",") if args.names else None)
    md = to_markdown(table, args.metric)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(md)
        with_relative_paths(table, out, ["eval_dir"]).to_csv(out / "table.csv", index=False)  # no machine's paths
        prov = provenance_rows(list(zip(table["run"], [_load(p) for p in args.runs])))
        (out / "provenance.md").write_text(provenance_markdown(prov, out))
        with_relative_paths(prov, out).to_csv(out / "provenance.csv", index=False)
        print(f"wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'provenance.md'} and "
              f"{out / 'provenance.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
