"""The CPU study's report: ``<out>/README.md``, tables and figures from the rows' records (``lite_cpu.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from lite_cpu_rows import (
    BLIND_SEEDS,
    CLEAN_SEEDS,
    DERIVED,
    ERRATA_CAUSE,
    PAIRS,
    PROBE_ROWS,
    ROWS,
    SEEDS,
    STRATEGIES,
    Row,
)

from polypsam import compare
from polypsam.reporting.study import paired_comparison, seed_mean, seed_spread, subset_means
from polypsam.reporting.study.figures import robustness_all, validation_curves
from polypsam.reporting.study.report import (
    RowResult,
    detection_markdown,
    errata_markdown,
    headline,
    paired_markdown,
    spread_markdown,
    subset_markdown,
)
from polypsam.reporting.study.strategies import (
    DIFFERS,
    paper_markdown,
    probes_markdown,
    row_cost,
    strategies_markdown,
)
from polypsam.training.run_metrics import read_metrics

# Rows trained before frozen parts were held in eval mode (issue 18): their old figures, kept for the errata
ERRATA_NAME = "errata_before.csv"
EXPLORATION = ("Rows marked *exploration* are methods each scored on the test images before the no-box method "
               "was chosen; they stay for what they show, never as the headline. The no-box headline is "
               "`dec_auto_blind`: its stage-1 source (the decoder's own prompt-free map, the U-Net, or their "
               "mean) and every proposal setting were chosen on each seed's validation split alone "
               "(`python -m polypsam.select_auto`, grid `blend` [0, 0.5, 1]), then evaluated once.")


def stretched_images(out: Path) -> dict[str, set[str]]:
    """Per test set, the images whose literal tight box a speck stretches (specks.json, by mask name)."""
    sets = json.loads((out / "specks.json").read_text()).get("sets", {})
    return {Path(k).name: {Path(m).stem for m in v.get("stretched_masks", {})}
            for k, v in sets.items() if k.startswith("TestDataset/")}


def _seeds(results: dict[str, RowResult], names: tuple[str, ...]) -> dict[str, pd.DataFrame]:
    return {n: results[n].summary for n in names if n in results}


def which_parts(out: Path, results: dict[str, RowResult], per_image: dict[str, pd.DataFrame],
                sets: list[str]) -> list[str]:
    """The section "Which parts to train": every strategy under the literal and the clean box, paired against
    decoder only (the per-image mean over its seeds) under the same box, with its cost."""
    probes = probes_markdown(out / "probes", PROBE_ROWS)
    lrs = [] if probes is None else [
        "Each encoder-trained row's learning rate (and, for encoders + decoder, whether the encoder's BatchNorm "
        "statistics are held: `strategy.norm_eval`) is chosen on validation: one epoch on 160 of its training "
        "images, scored on 120 of its validation images (`python experiments/lite_cpu.py --probe <probe>`); the "
        "best of a row's probes goes into its config once they have all run:", "",
        probes, ""]
    if "enc_dec_box_s42" not in results and "lora_box_full_s42" not in results:
        return ["## Which parts to train", "", "The encoder-trained rows (`enc_dec_box_s42`, `lora_box_full_s42`) "
                "have not finished yet; see the notes below for where they stand.", "", *lrs]
    parts = ["## Which parts to train", "",
             "The paper's question on LiteMedSAM: the same split, box prompts, recipe and evaluation; only what "
             "trains differs. Per-image Dice and IoU at 0.5 on the test images; the difference is the paired "
             "one against decoder only (per-image mean over its seeds) under the same box, with a 95% paired-"
             "bootstrap interval and the Wilcoxon p. Seconds per optimiser step: fit seconds (validation "
             "included) over optimiser steps, on the machine named.", ""]
    for box, column, reference in (("literal tight box (the paper's)", 2, "dec_box"), ("clean box", 3, "dec_box_clean")):
        rows = []
        for label, trains, *names in STRATEGIES:
            name = names[column - 2]
            if name not in results:
                continue
            ref = per_image.get(reference)
            paired = paired_comparison(per_image[name], ref) if ref is not None and not name.startswith("dec_box") \
                else None
            rows.append((label, trains, results[name].summary, row_cost(out / "rows" / name), paired))
        if rows:
            parts += [f"Under the {box}:", "", strategies_markdown(rows, sets), ""]
    parts += [*lrs, "The paper, for reference (oracle box; most likely the per-row MONAI Dice, not per-image):", "",
              paper_markdown(sets), "", DIFFERS, ""]
    return parts


def write_report(out: Path, done: list[tuple[Row, Path]], notes: Path) -> None:
    results = {}
    for row, ev in done:
        det = ev / "detection.csv"
        label = f"{row.label} *(exploration)*" if row.exploration and "exploration" not in row.label else row.label
        results[row.name] = RowResult(row.name, label, ev.relative_to(out), pd.read_csv(ev / "summary.csv"),
                                      pd.read_csv(ev / "per_image.csv"), pd.read_csv(det) if det.is_file() else None)
    compare.main([*map(str, (ev for _, ev in done)), "--names", ",".join(r.name for r, _ in done), "--out", str(out)])
    sets = sorted({s for r in results.values() for s in r.summary["dataset"]}, key=lambda s: s != "Kvasir")
    seeds, blind = _seeds(results, SEEDS), _seeds(results, BLIND_SEEDS)
    spread = seed_spread(seeds) if len(seeds) >= 2 else None
    per_image = {name: r.per_image for name, r in results.items()}
    for derived, names in (("dec_box", seeds), ("dec_auto_blind", blind),
                           ("dec_box_clean", _seeds(results, CLEAN_SEEDS))):
        if names:
            per_image[derived] = seed_mean([results[n].per_image for n in names])
    auto = next((ev for r, ev in done if r.name == "dec_auto"), None)
    if auto is not None and (auto / "per_image_box.csv").is_file():
        per_image["dec_mixed_box"] = pd.read_csv(auto / "per_image_box.csv")
    pairs = [(q, a, b, paired_comparison(per_image[a], per_image[b])) for q, a, b in PAIRS
             if a in per_image and b in per_image]
    runs = {r.name: r.job for r in ROWS} | {"dec_box": "+".join(SEEDS), "dec_mixed_box": "dec_mixed_s42",
                                           "dec_auto_blind": "+".join(BLIND_SEEDS), "dec_box_clean": "+".join(SEEDS)}
    curves = {r.name: read_metrics(out / "rows" / r.name / "csv") for r, _ in done
              if (out / "rows" / r.name / "csv" / "metrics.csv").is_file() and r.eval_dir == "eval"}
    (out / "figures").mkdir(exist_ok=True)
    if curves:
        validation_curves(curves).savefig(out / "figures" / "validation_curves.png")
    rob = {r.name: pd.read_csv(ev / "robustness.csv") for r, ev in done if (ev / "robustness.csv").is_file()}
    flat = {r.name: results[r.name].summary for r, ev in done if not (ev / "robustness.csv").is_file()}
    if rob:
        robustness_all(rob, flat).savefig(out / "figures" / "robustness.png")
    missing = [r for r in ROWS if r.name not in results]
    parts = ["# The CPU study: LiteMedSAM on real Kvasir-SEG and CVC-ClinicDB images", "",
             "Regenerate every number: `python experiments/lite_cpu.py` (resumable; finished rows are skipped; "
             "rows run after the rows they need). Rows, recipes and commands: `src/polypsam/conf/sweep/lite_cpu*.yaml`, "
             "`experiments/lite_cpu_rows.py`.", "", f"Rows finished: {len(results)} of {len(ROWS)}."]
    if missing:
        parts += ["Not run yet (the driver runs them next): " + ", ".join(f"`{r.name}`" for r in missing) + "."]
    parts += ["", "## Headline: per-image Dice at 0.5 on the test images", "", EXPLORATION, "",
              headline(list(results.values()), sets),
              "", "Per-image Dice and IoU at threshold 0.5 at the original resolution, mean over the images of a "
              "set, 95% percentile-bootstrap interval; mDice is the PraNet toolbox's (256 thresholds). The full "
              "table with IoU: [table.md](table.md); provenance of every row (config, split, checkpoint sha256, "
              "commit, hardware, precision, encoder runtime, wall-clock): [provenance.md](provenance.md).", ""]
    if spread is not None:
        parts += ["## Seeds (decoder only, box)", "", spread_markdown(spread), ""]
    if len(blind) >= 2:
        parts += ["## Seeds (no box, chosen on validation)", "", spread_markdown(seed_spread(blind)), ""]
    stretched = stretched_images(out)
    if any(stretched.values()):
        tables = [(r.label, subset_means(r.per_image, stretched)) for r in results.values()]
        parts += ["## Boxes stretched by a speck", "",
                  "Per-image Dice@0.5 over the test images whose literal tight box a speck stretches by more "
                  "than 10% ([specks.json](specks.json)) and over the other images, per row (image counts in "
                  "the header).", "", subset_markdown(tables, "stretched box", "other images"), ""]
    parts += which_parts(out, results, per_image, sets)
    if pairs:
        parts += ["## Paired comparisons on the same images", "",
                  "Per-image differences, a - b: mean with a 95% paired-bootstrap interval (10,000 resamples of "
                  "images) and the two-sided Wilcoxon signed-rank test. A difference smaller than the range over "
                  "the box row's seeds is called noise where rows of different training runs are compared. "
                  + "; ".join(f"`{k}`: {v}" for k, v in DERIVED.items() if k in per_image) + ".", "",
                  paired_markdown(pairs, spread, runs), ""]
    if (out / ERRATA_NAME).is_file():
        parts += ["## Errata: rows rerun with frozen parts held frozen", "", ERRATA_CAUSE, "",
                  errata_markdown(pd.read_csv(out / ERRATA_NAME), {n: r.summary for n, r in results.items()},
                                  {r.name: r.label for r in ROWS}), "",
                  "Old figures: the records of commit 19e0dc8 (`git show 19e0dc8:experiments/results/lite_cpu/"
                  "rows/<row>/eval/summary.csv`); what changed in the conclusions is in the notes below.", ""]
    for row in ROWS:
        if row.name in results and results[row.name].detection is not None:
            parts += [f"## No box: what stage 1 proposed ({row.label})", "",
                      detection_markdown(results[row.name].detection), ""]
    parts += ["## Figures", "", "- [prompt robustness, every row](figures/robustness.png)",
              "- [validation Dice per epoch, every trained row](figures/validation_curves.png)",
              "- best, median and worst image per row and set: `<run>/<eval>/figures/<set>.png` in each run "
              "folder (they show the real frames, which stay out of the repository)", "", notes.read_text()]
    (out / "README.md").write_text("\n".join(parts))
    print(f"[lite_cpu] wrote {out / 'README.md'} ({len(results)} rows)")
