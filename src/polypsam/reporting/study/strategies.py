"""Which parts to train: the study's strategies side by side, with their cost, beside the paper's Table 1.

Figures come from each row's records: ``eval/summary.csv`` (per-image Dice and IoU at 0.5), ``results.json``
(trainable parameters, fit seconds, epochs, effective batch, images used) and ``provenance.json`` (the
machine that trained it); the paired comparisons are ``paired_comparison`` tables against decoder only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from polypsam.reporting import tables as rep

# Li, Hu, Yang 2023 (arXiv:2305.00293), Table 1: SAM ViT-B, oracle box, per-row (MONAI) Dice and mIoU,
# as ../shared/FIELD_NOTES.md quotes them; never beside per-image Dice without saying so
PAPER_TABLE1 = {"Dec": {"Kvasir": (0.882, 0.835), "CVC-ClinicDB": (0.890, 0.837)},
                "Enc-Dec": {"Kvasir": (0.902, 0.863), "CVC-ClinicDB": (0.921, 0.877)}}
DIFFERS = ("What differs from the paper: the backbone (LiteMedSAM's TinyViT, 5.7 M encoder parameters, pretrained "
           "on medical images, against SAM ViT-B's 86 M pretrained on natural images); the resolution (256 px "
           "against 1024 px); the data (the 1,305 Kvasir-SEG / CVC-ClinicDB images of the shared folder: 964 "
           "training, 241 validation, 60 + 40 test images, against PraNet's 1,450 and 100 + 62); the metric "
           "(per-image Dice at 0.5, against what is most likely the per-row MONAI Dice); the schedule (early stop "
           "on validation Dice at effective batch 16 on a CPU, against 2 x V100 at effective batch 48); and the "
           "box (the literal tight box of the ground truth in both).")


@dataclass(frozen=True)
class Cost:
    trainable_params: int | None
    hours: float | None
    epochs: int | None
    s_per_step: float | None  # fit seconds per optimiser step, validation included
    hardware: str


def row_cost(row_dir: Path) -> Cost:
    """A trained row's cost from its copied results.json and provenance.json (zero-shot rows have neither)."""
    res = row_dir / "results.json"
    if not res.is_file():
        return Cost(None, None, None, None, "–")
    r = json.loads(res.read_text())
    prov = row_dir / "provenance.json"
    sessions = json.loads(prov.read_text()).get("sessions", []) if prov.is_file() else []
    cpus = sorted({s.get("hardware", {}).get("cpu", "?") for s in sessions})
    # every session's fit; a run resumed before the sessions were recorded has only its last one's: no figure
    fit = r.get("fit_seconds_all_sessions", r.get("fit_seconds") if len(sessions) <= 1 else None)
    epochs, used = r.get("epochs"), r.get("data", {}).get("train", {}).get("used")
    steps = epochs * math.ceil(used / r["effective_batch_size"]) if fit and epochs and used else None
    return Cost(r.get("trainable_params"), fit / 3600 if fit else None, epochs,
                fit / steps if steps else None, ", ".join(cpus) or "–")


def _paired(p: pd.DataFrame | None, dataset: str) -> str:
    if p is None or dataset not in set(p["dataset"]):
        return "–"
    r = p[p["dataset"] == dataset].iloc[0]
    pv = "–" if r["wilcoxon_p"] is None or pd.isna(r["wilcoxon_p"]) else f"{r['wilcoxon_p']:.2g}"
    return f"{r['diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}], p {pv}"


def strategies_markdown(rows: list[tuple[str, str, pd.DataFrame, Cost, pd.DataFrame | None]],
                        sets: list[str]) -> str:
    """(label, what trains, summary.csv, cost, paired table against decoder only or None) per strategy ->
    one table of Dice and IoU per set, the paired difference in Dice, and the cost."""
    head = ["strategy", "trains"]
    for s in sets:
        short = rep.SHORT_NAMES.get(s, s)
        head += [f"{short} Dice", f"{short} IoU", f"{short} Dice − decoder only [95% CI], Wilcoxon p"]
    head += ["trainable params", "epochs", "training h", "s / optimiser step", "trained on"]
    body = []
    for label, trains, summary, cost, paired in rows:
        by = rep.summary_rows_by_set(summary)
        line = [label, trains]
        for s in sets:
            line += [rep.fmt(by[s]["dice"]) if s in by else "–", rep.fmt(by[s]["iou"]) if s in by else "–",
                     _paired(paired, s)]
        line += [f"{cost.trainable_params / 1e6:.2f} M" if cost.trainable_params else "–",
                 str(cost.epochs or "–"), f"{cost.hours:.2f}" if cost.hours else "–",
                 f"{cost.s_per_step:.1f}" if cost.s_per_step else "–", cost.hardware]
        body.append(line)
    return rep.markdown_table(head, body)


def paper_markdown(sets: list[str]) -> str:
    head = ["Polyp-SAM (SAM ViT-B), Table 1"] + [f"{rep.SHORT_NAMES.get(s, s)} DSC / mIoU" for s in sets]
    body = [[k] + [f"{v[s][0]:.3f} / {v[s][1]:.3f}" if s in v else "–" for s in sets]
            for k, v in PAPER_TABLE1.items()]
    return rep.markdown_table(head, body)


def probes_markdown(probes: Path, rows: dict[str, str]) -> str | None:
    """The learning rates (and variants) each encoder-trained row's probes tried (``<out>/probes/<probe>.csv``,
    written by ``lite_cpu.py --probe``; ``rows``: probe -> the row it chooses for), their best validation Dice,
    and the best for each row over all its probes (what its config takes once they have run). None without probes."""
    tables = {f.stem: pd.read_csv(f) for f in sorted(probes.glob("*.csv"))} if probes.is_dir() else {}
    if not tables:
        return None
    best = {}
    for name, t in tables.items():
        row = rows.get(name, name)
        if row not in best or t["best_val_dice"].max() > best[row][1]:
            best[row] = (name, t["best_val_dice"].max())
    body = [[rows.get(name, name), name, f"{r.lr:g}", f"{r.best_val_dice:.4f}", f"{r.fit_seconds / 60:.0f}",
             "best" if best[rows.get(name, name)] == (name, r.best_val_dice) else ""]
            for name, t in tables.items() for _, r in t.iterrows()]
    return rep.markdown_table(["row", "probe", "lr", "best validation Dice", "fit min", ""], body)
