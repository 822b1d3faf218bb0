"""Tables of an evaluation in markdown: the paper's Table 2 layout with its quoted rows, metric tables, robustness.

Everything here reads plain data (dicts, DataFrames), so that the notebook and ``polypsam.compare`` can rebuild
any table from an evaluation directory (``polypsam.reporting.evaluation_dir``) without a model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from polypsam.data.files import STANDARD_TEST_SETS

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


__all__ = [
    "METRIC_LABELS", "PAIRS", "PUBLISHED_TABLE2", "SHORT_NAMES", "fmt", "markdown_table", "metrics_markdown",
    "ordered_sets", "robustness_markdown", "summary_rows_by_set", "table2_markdown",
]
