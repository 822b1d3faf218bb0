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

from polypsam.cli import run_cli
from polypsam.reporting import tables as rep
from polypsam.reporting.compare import compare, load, to_markdown
from polypsam.reporting.provenance_table import provenance_markdown, provenance_rows, with_relative_paths


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
        prov = provenance_rows(list(zip(table["run"], [load(p) for p in args.runs])))
        (out / "provenance.md").write_text(provenance_markdown(prov, out))
        with_relative_paths(prov, out).to_csv(out / "provenance.csv", index=False)
        print(f"wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'provenance.md'} and "
              f"{out / 'provenance.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
