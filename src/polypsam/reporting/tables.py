"""Tables and figures of an evaluation: the paper's Table 2 layout, metric tables, case figures, robustness.

Everything here reads plain data (dicts, DataFrames, the files ``polypsam.evaluate`` writes), so that the
notebook and ``polypsam.compare`` can rebuild any table from an evaluation directory without a model.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from polypsam.data.files import STANDARD_TEST_SETS
from polypsam.data.io import read_image, read_mask
from polypsam.errors import DataError
from polypsam.reporting.drawing import overlay

# Short column names used in the paper's tables.
SHORT_NAMES = {"Kvasir": "Kvasir", "CVC-ClinicDB": "ClinicDB", "CVC-ColonDB": "ColonDB", "CVC-300": "CVC-300",
               "ETIS-LaribPolypDB": "ETIS"}

# Published rows beside which Polyp-SAM's Table 2 (Li, Hu, Yang 2023, arXiv:2305.00293) puts its own.
# Every number is QUOTED, never measured here; None marks a value we could not confirm from a source we read
# (shown as "n/a" rather than guessed). Values are kept as the strings printed in the source.
#  * U-Net, Polyp-PVT: PraNet's protocol (train 900 Kvasir + 550 ClinicDB), toolbox mDice / mIoU, as
#    printed in Polyp-PVT (Dong et al., CAAI AIR 2023) and tabulated in Wu et al. 2024, "Colorectal Polyp
#    Segmentation in the Deep Learning Era: A Comprehensive Survey", Table V.
#  * HSNet: Zhang et al., Comput. Biol. Med. 150:106173 (2022), numbers from the official README
#    (github.com/baiboat/HSNet); it prints the ETIS mIoU with two digits (0.74).
#  * Polyp-SAM-B (image encoder + decoder trained): Dice as given in this project's evaluation issue from
#    the Polyp-SAM paper (MONAI Dice on (1,H,W) tensors, i.e. the per-row metric, see
#    metrics.row_dice_iou_monai_compat); its mIoU and the Polyp-SAM-L row could not be confirmed from a
#    source we could read.
#  * ASPS (Li et al., MICCAI 2024, a SAM-based prompt-free method): Kvasir and ClinicDB mDice as given in
#    this project's prompt-free issue; its other sets and mIoU could not be confirmed.
# "prompt": what the method is given at test time: "none" (prompt-free) or "box" (a ground-truth box).
PUBLISHED_TABLE2: list[dict] = [
    {"method": "U-Net", "metric": "toolbox mDice / mIoU", "prompt": "none", "values": {
        "Kvasir": ("0.818", "0.746"), "CVC-ClinicDB": ("0.823", "0.755"), "CVC-ColonDB": ("0.512", "0.444"),
        "CVC-300": ("0.710", "0.627"), "ETIS-LaribPolypDB": ("0.398", "0.335")}},
    {"method": "Polyp-PVT", "metric": "toolbox mDice / mIoU", "prompt": "none", "values": {
        "Kvasir": ("0.917", "0.864"), "CVC-ClinicDB": ("0.937", "0.889"), "CVC-ColonDB": ("0.808", "0.727"),
        "CVC-300": ("0.900", "0.833"), "ETIS-LaribPolypDB": ("0.787", "0.706")}},
    {"method": "HSNet", "metric": "toolbox mDice / mIoU", "prompt": "none", "values": {
        "Kvasir": ("0.926", "0.877"), "CVC-ClinicDB": ("0.948", "0.905"), "CVC-ColonDB": ("0.810", "0.735"),
        "CVC-300": ("0.903", "0.839"), "ETIS-LaribPolypDB": ("0.808", "0.74")}},
    {"method": "ASPS", "metric": "toolbox mDice", "prompt": "none", "values": {
        "Kvasir": ("0.920", None), "CVC-ClinicDB": ("0.951", None)}},
    {"method": "Polyp-SAM-B", "metric": "MONAI per-row Dice", "prompt": "box", "values": {
        "Kvasir": ("0.902", None), "CVC-ClinicDB": ("0.921", None), "CVC-ColonDB": ("0.894", None),
        "CVC-300": ("0.924", None), "ETIS-LaribPolypDB": ("0.903", None)}},
    {"method": "Polyp-SAM-L", "metric": "MONAI per-row Dice", "prompt": "box", "values": {}},
]

METRIC_LABELS = {
    "dice": "Dice@0.5", "iou": "IoU@0.5", "mean_dice": "mDice", "mean_iou": "mIoU", "s_measure": "S_alpha",
    "wf_measure": "wF", "mean_e_measure": "mE", "max_e_measure": "maxE", "mae": "MAE", "row_dice": "row Dice",
    "row_iou": "row IoU",
}
# which (Dice, IoU) pair a Table 2 row of ours reports
PAIRS = {"dice": ("dice", "iou"), "mean_dice": ("mean_dice", "mean_iou"), "row_dice": ("row_dice", "row_iou")}


def fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    if isinstance(v, str):
        return v
    return f"{float(v):.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                   align: Sequence[str] | None = None) -> str:
    align = align or ["l"] + ["r"] * (len(headers) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def ordered_sets(names: Sequence[str], with_standard: bool = False) -> list[str]:
    """The paper's order first (optionally all five even if absent), other folders alphabetically."""
    names = list(dict.fromkeys(names))
    head = [n for n in STANDARD_TEST_SETS if with_standard or n in names]
    return head + sorted(n for n in names if n not in STANDARD_TEST_SETS)


def table2_markdown(ours: Sequence[tuple[str, dict[str, tuple[float, float]]]], quoted: bool | str = True) -> str:
    """Paper Table 2 layout: data sets as columns with DSC / mIoU sub-columns, quoted rows first.

    ``ours`` is a list of (row label, {set: (dsc, miou)}). The five standard sets are always columns (so
    the quoted rows have somewhere to go); extra test folders of ours follow. ``quoted``: every published
    row, none, or only those given the same test-time prompt (``"none"`` or ``"box"``): like with like.
    """
    sets = ordered_sets([s for _, vals in ours for s in vals], with_standard=True)
    headers = ["Method"] + [h for s in sets for h in (SHORT_NAMES.get(s, s), "")]
    sub = [""] + ["DSC", "mIoU"] * len(sets)
    rows = [sub]
    if quoted:
        for entry in (e for e in PUBLISHED_TABLE2 if quoted is True or e["prompt"] == quoted):
            cells = []
            for s in sets:
                if s not in STANDARD_TEST_SETS:  # not in the paper
                    cells += ["–", "–"]
                    continue
                d, i = entry["values"].get(s, (None, None))
                cells += [fmt(d), fmt(i)]
            rows.append([f"{entry['method']} (quoted; {entry['metric']})"] + cells)
    for label, vals in ours:
        cells = []
        for s in sets:
            d, i = vals.get(s, (None, None))
            cells += [fmt(d) if s in vals else "–", fmt(i) if s in vals else "–"]
        rows.append([label] + cells)
    return markdown_table(headers, rows)


def summary_rows_by_set(summary: pd.DataFrame) -> dict[str, dict]:
    return {str(r["dataset"]): r for r in summary.to_dict("records")}


def metrics_markdown(summary: pd.DataFrame, keys: Sequence[str]) -> str:
    """A row per data set: count, unreadable, Dice/IoU with 95 % bootstrap interval, the other metrics."""
    headers = ["Data set", "images", "unreadable", "Dice@0.5 [95% CI]", "IoU@0.5 [95% CI]"]
    rest = [k for k in keys if k not in ("dice", "iou")]
    headers += [METRIC_LABELS.get(k, k) for k in rest]
    rows = []
    for r in summary.to_dict("records"):
        rows.append([r["dataset"], str(int(r["n_images"])), str(int(r["n_unreadable"])),
                     f"{fmt(r['dice'])} [{fmt(r['dice_ci_low'])}, {fmt(r['dice_ci_high'])}]",
                     f"{fmt(r['iou'])} [{fmt(r['iou_ci_low'])}, {fmt(r['iou_ci_high'])}]"]
                    + [fmt(r[k]) for k in rest])
    return markdown_table(headers, rows)


def robustness_markdown(robust: pd.DataFrame) -> str:
    """Dice per data set (columns) against box noise (rows)."""
    sets = ordered_sets(robust["dataset"].astype(str).unique())
    headers = ["box noise (fraction of box side)"] + [SHORT_NAMES.get(s, s) for s in sets]
    rows = []
    for noise, grp in robust.groupby("noise", sort=True):
        by = {str(r["dataset"]): r for r in grp.to_dict("records")}
        cells = [f"{fmt(r['dice'])} [{fmt(r['dice_ci_low'])}, {fmt(r['dice_ci_high'])}]" if (r := by.get(s))
                 else "–" for s in sets]
        rows.append([f"{noise:g}", *cells])
    return markdown_table(headers, rows)


# ------------------------------------------------------------------------------------------------ figures


# Figures are built on matplotlib.figure.Figure, not pyplot: no global state, no backend switch (a notebook
# keeps its inline backend, a headless run needs no display), nothing to close.


def figure_png(fig, dpi: int | None = None) -> bytes:
    """PNG bytes of a figure (for notebooks: IPython.display.Image(figure_png(fig)))."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def robustness_figure(robust: pd.DataFrame, references: dict[str, dict[str, float]] | None = None):
    """Dice against box noise per set; ``references`` ({row: {set: dice}}, e.g. ``auto``) are drawn as
    horizontal lines in each set's colour: the noise a human box may have before that row wins."""
    fig = Figure(figsize=(5.5, 3.8), dpi=110)
    ax = fig.subplots()
    styles = iter(["--", ":", "-."])
    refs = {row: (next(styles, "--"), vals) for row, vals in (references or {}).items()}
    for s in ordered_sets(robust["dataset"].astype(str).unique()):
        d = robust[robust["dataset"].astype(str) == s].sort_values("noise")
        x = d["noise"].to_numpy(float) * 100
        (line,) = ax.plot(x, d["dice"], marker="o", label=SHORT_NAMES.get(s, s))
        ax.fill_between(x, d["dice_ci_low"], d["dice_ci_high"], alpha=0.15)
        for row, (style, vals) in refs.items():
            if s in vals:
                ax.axhline(vals[s], color=line.get_color(), linestyle=style, linewidth=1.2,
                           label=f"{SHORT_NAMES.get(s, s)}: {row}")
    ax.set_xlabel("box noise: each side moved by up to this % of the box side")
    ax.set_ylabel("mean per-image Dice")
    ax.set_title("Prompt robustness")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def cases_figure(cases: Sequence[dict], title: str):
    """Rows of (image + box, ground truth, prediction + box); each case: image, gt, pred, boxes, label."""
    n = max(1, len(cases))
    fig = Figure(figsize=(10, 3.2 * n), dpi=100)
    axes = fig.subplots(n, 3, squeeze=False)
    for row, case in zip(axes, cases):
        img, gt, pred, boxes = case["image"], case["gt"], case["pred"], case.get("boxes")
        empty = np.zeros_like(gt, dtype=bool)
        panels = [(overlay(img, empty, empty, boxes), "image + box prompt"),
                  (overlay(img, gt, empty), "ground truth (green)"),
                  (overlay(img, gt, pred, boxes), "prediction (red) + box")]
        for ax, (im, sub) in zip(row, panels):
            ax.imshow(im)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(sub, fontsize=8)
        row[0].set_ylabel(case["label"], fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def pick_cases(per_image: pd.DataFrame, metric: str = "dice") -> list[tuple[str, dict]]:
    """Best, median and worst readable image by ``metric`` (fewer when the set is smaller)."""
    ok = per_image[per_image["status"] == "ok"].sort_values([metric, "image"], ascending=[False, True])
    if ok.empty:
        return []
    recs = ok.to_dict("records")
    picks = [("best", recs[0]), ("median", recs[len(recs) // 2]), ("worst", recs[-1])]
    seen, out = set(), []
    for tag, r in picks:
        if r["image"] not in seen:
            seen.add(r["image"])
            out.append((tag, r))
    return out


def parse_boxes(text) -> np.ndarray:
    if not isinstance(text, str) or not text.strip():
        return np.zeros((0, 4), np.float32)
    return np.array([[float(v) for v in b.split(",")] for b in text.split(";")], np.float32)


# ------------------------------------------------------------------------------------ evaluation directory


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


def worst_cases_figure(evaluation: dict, n: int = 6, metric: str = "dice"):
    """The n lowest-scoring readable images over all sets, from the saved masks (save_masks=true)."""
    d, per = evaluation["dir"], evaluation["per_image"]
    ok = per[(per["status"] == "ok") & per["pred_mask"].notna()].sort_values(metric).head(n)
    cases = []
    for r in ok.to_dict("records"):
        cases.append({"image": read_image(r["image_path"]), "gt": read_mask(r["mask_path"]),
                      "pred": read_mask(d / r["pred_mask"]), "boxes": parse_boxes(r["box"]),
                      "label": f"{r['dataset']}/{r['image']}\n{METRIC_LABELS.get(metric, metric)} "
                               f"{r[metric]:.3f}"})
    return cases_figure(cases, f"{len(cases)} worst images by {METRIC_LABELS.get(metric, metric)}")


__all__ = [
    "PUBLISHED_TABLE2", "SHORT_NAMES", "cases_figure", "figure_png", "find_eval_dir", "load_evaluation",
    "markdown_table", "metrics_markdown", "ordered_sets", "pick_cases", "robustness_figure",
    "robustness_markdown", "table2_markdown", "worst_cases_figure",
]
