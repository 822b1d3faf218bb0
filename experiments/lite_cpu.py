"""The CPU study: every row on ../shared/data/polyp with one split file, then experiments/results/lite_cpu/.

    python experiments/lite_cpu.py                     # run what is missing, then write the report
    python experiments/lite_cpu.py --report-only       # the report from the rows finished so far
    python experiments/lite_cpu.py --rows dec_box_s43 dec_box_s44 --runs /scratch/lite_cpu

A finished row is skipped: its evaluation in the runs folder holds summary.csv, or its records are
already in experiments/results/lite_cpu/rows/ (``--rerun`` runs such rows again). A run with a last.ckpt
resumes (``resume=<run>``); the others start fresh from conf/sweep/lite_cpu_jobs/. Stop it at any time
(Ctrl-C, SIGTERM, the end of a session): the next call continues where it stopped. The report is built
from the records, so rows run in other sessions (their run folders elsewhere) stay in it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
from PIL import Image

from polypsam import compare
from polypsam.prompts import auto_settings
from polypsam.run_metrics import read_metrics
from polypsam.study import paired_comparison, seed_mean, seed_spread, subset_means
from polypsam.study.figures import robustness_all, validation_curves
from polypsam.study.report import (
    RowResult,
    detection_markdown,
    errata_markdown,
    headline,
    paired_markdown,
    spread_markdown,
    subset_markdown,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the rows beside this script
from lite_cpu_rows import DERIVED, ERRATA_CAUSE, PAIRS, ROWS, SEEDS, Row, proposer_ckpt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "experiments" / "results" / "lite_cpu"
DATA = Path(os.environ.get("POLYPSAM_DATA_ROOT", REPO.parent / "shared" / "data" / "polyp"))


# Rows trained before frozen parts were held in eval mode (issue 18): their old figures, kept for the errata
ERRATA = OUT / "errata_before.csv"


def settings_file(row: Row, runs: Path) -> Path:
    """Where select_auto writes the row's chosen settings: beside the checkpoint (one file per proposer), or
    ``<stem>.auto-<row>.json`` for a row with its own grid."""
    best = run_dir(row, runs) / "checkpoints" / "best.ckpt"
    return best.with_name(f"best.auto-{row.name}.json") if row.grid else auto_settings.beside(best, proposer_ckpt(row, runs))


def run_dir(row: Row, runs: Path) -> Path:
    return runs / (row.job or row.name)


def eval_dir(row: Row, runs: Path) -> Path:
    return run_dir(row, runs) / row.eval_dir if row.job else run_dir(row, runs)


def _call(module: str, *args: str) -> None:
    print(f"[lite_cpu] python -m {module} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", module, *args], check=True, cwd=REPO)


def record_dir(row: Row) -> Path:
    """The row's records in the repository (what the report reads)."""
    return OUT / "rows" / row.name / (row.eval_dir if row.job else "")


def run_row(row: Row, runs: Path, rerun: bool = False) -> None:
    """Train (fresh or resumed) and evaluate one row, skipping what is done."""
    if not rerun and (record_dir(row) / "summary.csv").is_file() and not (eval_dir(row, runs)).exists():
        print(f"[lite_cpu] {row.name}: finished (records in {record_dir(row)}); skipped")
        return
    run = run_dir(row, runs)
    if row.job and not (run / "eval" / "summary.csv").is_file():
        if (run / "checkpoints" / "last.ckpt").is_file():
            _call("polypsam.train", f"resume={run}")
        else:
            _call("polypsam.train", "+sweep=lite_cpu", f"+sweep/lite_cpu_jobs={row.job}", f"hydra.run.dir={run}")
    out = eval_dir(row, runs)
    best = run / "checkpoints" / "best.ckpt"
    own = [f"out={settings_file(row, runs)}", *row.grid] if row.grid else []
    if row.select and not settings_file(row, runs).is_file():
        _call("polypsam.select_auto", f"ckpt_path={best}", *row.proposer_args(runs), *own, f"data.root={DATA}",
              f"data.split_file={OUT / 'split.json'}", f"hydra.run.dir={out.with_name(f'select_{out.name}')}")
    if row.evaluate and not (out / "summary.csv").is_file():
        ckpt = [f"ckpt_path={best}"] if row.job else []
        chosen = [f"prompt.settings={settings_file(row, runs)}"] if row.grid else []
        _call("polypsam.evaluate", *ckpt, *row.evaluate, *row.proposer_args(runs), *chosen, f"data.root={DATA}",
              f"hydra.run.dir={out}")


def copy_records(row: Row, runs: Path) -> Path | None:
    """The row's small records beside the report (no checkpoint: its sha256 is in meta.json); the records
    already there when the run folder is not in ``runs``; None when the row has not finished."""
    src, dst = eval_dir(row, runs), OUT / "rows" / row.name
    if not (src / "summary.csv").is_file():
        return record_dir(row) if (record_dir(row) / "summary.csv").is_file() else None
    if dst.exists():
        shutil.rmtree(dst)
    ev = dst / row.eval_dir if row.job else dst
    ev.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix in (".csv", ".json", ".md", ".yaml"):
            shutil.copy(f, ev / f.name)
    chosen = settings_file(row, runs)
    if row.select and chosen.is_file():  # the settings the evaluation read, chosen on the validation split
        shutil.copy(chosen, ev / chosen.name)
    # the best/median/worst figures show real frames: they stay in the run folder, never in the repository
    for f in sorted(src.glob("robustness.png")):
        (ev / "figures").mkdir(exist_ok=True)
        im = Image.open(f).convert("RGB")
        im.thumbnail((1100, 1100))
        im.save(ev / "figures" / f"{f.stem}.jpg", quality=80)
    if row.job:
        run = run_dir(row, runs)
        for name in ("config_resolved.yaml", "split.json", "results.json", "provenance.json", "data_report.json"):
            if (run / name).is_file():
                shutil.copy(run / name, dst / name)
        for part in sorted((run / "csv").glob("metrics*.csv")):  # metrics.csv and the parts of earlier sessions
            (dst / "csv").mkdir(exist_ok=True)
            shutil.copy(part, dst / "csv" / part.name)
    return ev


def data_notes(runs: Path) -> None:
    """polypsam's own data reports: masks stretched by specks, test frames with a near-duplicate in training."""
    if not (OUT / "specks.json").is_file():
        _call("polypsam.data.specks", str(DATA), "--out", str(OUT / "specks.json"))
    if not (OUT / "neighbours.json").is_file():
        _call("polypsam.data.neighbours", str(DATA), "--split", str(OUT / "split.json"), "--out",
              str(OUT / "neighbours.json"))


def stretched_images() -> dict[str, set[str]]:
    """Per test set, the images whose literal tight box a speck stretches (specks.json, by mask name)."""
    sets = json.loads((OUT / "specks.json").read_text()).get("sets", {})
    return {Path(k).name: {Path(m).stem for m in v.get("stretched_masks", {})}
            for k, v in sets.items() if k.startswith("TestDataset/")}


def write_report(done: list[tuple[Row, Path]]) -> None:
    results = {}
    for row, ev in done:
        det = ev / "detection.csv"
        results[row.name] = RowResult(row.name, row.label, ev.relative_to(OUT), pd.read_csv(ev / "summary.csv"),
                                      pd.read_csv(ev / "per_image.csv"), pd.read_csv(det) if det.is_file() else None)
    compare.main([*map(str, (ev for _, ev in done)), "--names", ",".join(r.name for r, _ in done), "--out", str(OUT)])
    sets = sorted({s for r in results.values() for s in r.summary["dataset"]}, key=lambda s: s != "Kvasir")
    seeds = {n: results[n].summary for n in SEEDS if n in results}
    spread = seed_spread(seeds) if len(seeds) >= 2 else None
    per_image = {name: r.per_image for name, r in results.items()}
    if seeds:
        per_image["dec_box"] = seed_mean([results[n].per_image for n in seeds])
    auto = next((ev for r, ev in done if r.name == "dec_auto"), None)
    if auto is not None and (auto / "per_image_box.csv").is_file():
        per_image["dec_mixed_box"] = pd.read_csv(auto / "per_image_box.csv")
    pairs = [(q, a, b, paired_comparison(per_image[a], per_image[b])) for q, a, b in PAIRS
             if a in per_image and b in per_image]
    runs = {r.name: r.job for r in ROWS} | {"dec_box": "+".join(SEEDS), "dec_mixed_box": "dec_mixed_s42"}
    curves = {r.name: read_metrics(OUT / "rows" / r.name / "csv") for r, _ in done
              if (OUT / "rows" / r.name / "csv" / "metrics.csv").is_file() and r.eval_dir == "eval"}
    (OUT / "figures").mkdir(exist_ok=True)
    if curves:
        validation_curves(curves).savefig(OUT / "figures" / "validation_curves.png")
    rob = {r.name: pd.read_csv(ev / "robustness.csv") for r, ev in done if (ev / "robustness.csv").is_file()}
    flat = {r.name: results[r.name].summary for r, ev in done if not (ev / "robustness.csv").is_file()}
    if rob:
        robustness_all(rob, flat).savefig(OUT / "figures" / "robustness.png")
    missing = [r for r in ROWS if r.name not in results]
    text = (REPO / "experiments" / "lite_cpu_notes.md").read_text()
    parts = ["# The CPU study: LiteMedSAM on real Kvasir-SEG and CVC-ClinicDB images", "",
             "Regenerate every number: `python experiments/lite_cpu.py` (resumable; finished rows are skipped). "
             "Rows, recipes and commands: `src/polypsam/conf/sweep/lite_cpu*.yaml`, `experiments/lite_cpu.py`.", "",
             f"Rows finished: {len(results)} of {len(ROWS)}."]
    if missing:
        parts += ["Not run yet (the driver runs them next): " + ", ".join(f"`{r.name}`" for r in missing) + "."]
    parts += ["", "## Headline: per-image Dice at 0.5 on the test images", "", headline(list(results.values()), sets),
              "", "Per-image Dice and IoU at threshold 0.5 at the original resolution, mean over the images of a "
              "set, 95% percentile-bootstrap interval; mDice is the PraNet toolbox's (256 thresholds). The full "
              "table with IoU: [table.md](table.md); provenance of every row (config, split, checkpoint sha256, "
              "commit, hardware, wall-clock): [provenance.md](provenance.md).", ""]
    if spread is not None:
        parts += ["## Seeds (decoder only, box)", "", spread_markdown(spread), ""]
    stretched = stretched_images()
    if any(stretched.values()):
        tables = [(r.label, subset_means(r.per_image, stretched)) for r in results.values()]
        parts += ["## Boxes stretched by a speck", "",
                  "Per-image Dice@0.5 over the test images whose literal tight box a speck stretches by more "
                  "than 10% ([specks.json](specks.json)) and over the other images, per row (image counts in "
                  "the header).", "", subset_markdown(tables, "stretched box", "other images"), ""]
    if pairs:
        parts += ["## Paired comparisons on the same images", "",
                  "Per-image differences, a - b: mean with a 95% paired-bootstrap interval (10,000 resamples of "
                  "images) and the two-sided Wilcoxon signed-rank test. A difference smaller than the range over "
                  "seeds is called noise where rows of different training runs are compared. "
                  + "; ".join(f"`{k}`: {v}" for k, v in DERIVED.items() if k in per_image) + ".", "",
                  paired_markdown(pairs, spread, runs), ""]
    if ERRATA.is_file():
        parts += ["## Errata: rows rerun with frozen parts held frozen", "", ERRATA_CAUSE, "",
                  errata_markdown(pd.read_csv(ERRATA), {n: r.summary for n, r in results.items()},
                                  {r.name: r.label for r in ROWS}), "",
                  "Old figures: the records of commit 19e0dc8 (`git show 19e0dc8:experiments/results/lite_cpu/"
                  "rows/<row>/eval/summary.csv`); what changed in the conclusions is in the notes below.", ""]
    for name, title in (("dec_auto", "default settings"), ("dec_auto_sel", "settings chosen on validation"),
                        ("dec_auto_unet", "a U-Net as stage 1, settings chosen on validation"),
                        ("dec_auto_ens", "stage 1 the mean of the U-Net and SAM, settings chosen on validation")):
        if name in results and results[name].detection is not None:
            parts += [f"## No box: what stage 1 proposed ({title})", "", detection_markdown(results[name].detection),
                      ""]
    parts += ["## Figures", "", "- [prompt robustness, every row](figures/robustness.png)",
              "- [validation Dice per epoch, every trained row](figures/validation_curves.png)",
              "- best, median and worst image per row and set: `<run>/<eval>/figures/<set>.png` in each run "
              "folder (they show the real frames, which stay out of the repository)", "", text]
    (OUT / "README.md").write_text("\n".join(parts))
    print(f"[lite_cpu] wrote {OUT / 'README.md'} ({len(results)} rows)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default=str(REPO / "outputs" / "lite_cpu"), help="where the runs live")
    ap.add_argument("--rows", nargs="*", help="only these rows (default: all)")
    ap.add_argument("--report-only", action="store_true", help="write the report from the finished rows")
    ap.add_argument("--rerun", action="store_true", help="run rows again even when their records are in the repository")
    args = ap.parse_args(argv)
    runs = Path(args.runs).resolve()
    chosen = [r for r in ROWS if not args.rows or r.name in args.rows]
    if not args.report_only:
        for row in chosen:
            run_row(row, runs, args.rerun)
    data_notes(runs)
    done = [(r, ev) for r in ROWS if (ev := copy_records(r, runs)) is not None]
    if not done:
        print("[lite_cpu] no row has finished yet; nothing to report")
        return 1
    write_report(done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
