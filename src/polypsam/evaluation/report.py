"""Evaluation outputs: summary.md (the paper's Table 2 layout), CSV files, figures and W&B tables."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd

from polypsam.data.io import read_image, read_mask
from polypsam.evaluation.runner import EvalResult
from polypsam.evaluation.settings import METRICS, UNREADABLE_CONVENTION, EvalSettings
from polypsam.metrics import EMPTY_GT_CONVENTION
from polypsam.reporting import figures
from polypsam.reporting import tables as rep


def our_table2_rows(summary: pd.DataFrame, label: str, compat_row_dice: bool = False
                    ) -> list[tuple[str, dict]]:
    """Our rows for the Table 2 layout: per-image Dice@0.5 (the headline), the toolbox's mDice/mIoU (like
    for like with the quoted PraNet-family rows) and, on request, Polyp-SAM's per-row metric."""
    by = rep.summary_rows_by_set(summary)

    def pair(d: str, i: str) -> dict:
        return {k: (v[d], v[i]) for k, v in by.items()}

    rows = [(f"**{label} (ours, per-image Dice/IoU @0.5)**", pair("dice", "iou")),
            (f"{label} (ours, toolbox mDice/mIoU)", pair("mean_dice", "mean_iou"))]
    if compat_row_dice:
        rows.append((f"{label} (ours, Polyp-SAM compat: MONAI per-row Dice/IoU)",
                     pair("row_dice", "row_iou")))
    return rows


QUOTED_NOTE = (
    "Quoted rows are copied from their papers, not measured here, and use their authors' metric (named in "
    "the row): the PraNet/Polyp-PVT toolbox's mDice averages Dice over 256 thresholds; Polyp-SAM's "
    "published Dice is MONAI's per-row Dice (see `compat_row_dice`). Only like-for-like rows compare. "
    "`n/a`: a published value we could not confirm; `–`: a set not in that source or not evaluated here."
)
MAPPING_NOTE = (
    "Metrics are computed per image at the original resolution: the prediction is cropped out of the "
    "padded canvas and resized back, as the preprocessing recorded."
)


DETECTION_NOTE = (
    "Detection (prompt=auto): `missed` counts frames holding a polyp where stage 1 proposed nothing (scored "
    "with an empty mask, never dropped); `false proposals` counts proposed boxes holding no ground-truth "
    "pixel (highlights, instruments); `correct rejections` counts frames without a polyp and without a "
    "proposal (Dice 1 by the empty-mask convention); `false alarms` frames without a polyp with a proposal."
)


def _table2_sections(result: EvalResult, compat_row_dice: bool) -> list[str]:
    """Like with like: prompt-free rows beside the published prompt-free methods, oracle-box rows beside
    Polyp-SAM's; a box- or click-prompted evaluation keeps the one table with every quoted row."""
    meta, label = result.meta, result.meta["label"]
    prompt = meta["prompt"].get("label", meta["prompt"].get("type", "box"))
    if not result.companions and meta["prompt"].get("type") != "none":
        return ["## Table 2 layout (DSC / mIoU)", "",
                rep.table2_markdown(our_table2_rows(result.summary, label, compat_row_dice)), ""]
    main = our_table2_rows(result.summary, f"{label}, {prompt}", compat_row_dice)
    free = main + [row for name in ("none",) if name in result.companion_summaries
                   for row in our_table2_rows(result.companion_summaries[name], f"{label}, no prompt")]
    parts = ["## Table 2 layout, prompt-free (DSC / mIoU)", "",
             "Beside the published prompt-free methods: compare the toolbox mDice/mIoU rows.", "",
             rep.table2_markdown(free, quoted="none"), ""]
    if "box" in result.companion_summaries:
        boxed = our_table2_rows(result.companion_summaries["box"], f"{label}, oracle box", compat_row_dice)
        parts += ["## Table 2 layout, oracle box (DSC / mIoU)", "",
                  "The same network given the ground-truth tight box, beside Polyp-SAM's (box-prompted) rows.",
                  "", rep.table2_markdown(boxed, quoted="box"), ""]
    return parts


def summary_markdown(result: EvalResult, compat_row_dice: bool = False) -> str:
    meta, summary = result.meta, result.summary
    keys = [k for k in METRICS if compat_row_dice or k not in ("row_dice", "row_iou")]
    lim = meta.get("limit_test")
    subset = f" (seeded subset: data.limit_test={lim} per set)" if lim else ""
    parts = [f"# Evaluation: {meta['label']}", "",
             f"- model: `{meta['model']}`; strategy: `{meta['strategy']}`; split: `{meta['split']}`",
             f"- checkpoint: `{meta['checkpoint'] or 'none (zero-shot)'}`",
             f"- data: `{meta['data_root']}`; images: {meta['n_images']}{subset}",
             f"- prompt: {meta['prompt']['description']}; threshold {meta['threshold']}",
             f"- unreadable images: {meta['n_unreadable']}", ""]
    if meta.get("untrained_prompt"):
        parts += [f"> **Warning:** {meta['untrained_prompt']}", ""]
    parts += [*_table2_sections(result, compat_row_dice), QUOTED_NOTE, ""]
    if compat_row_dice:
        gap = [f"{rep.SHORT_NAMES.get(r['dataset'], r['dataset'])} {r['row_dice'] - r['dice']:+.3f}"
               for r in summary.to_dict("records")]
        parts += ["Compatibility mode: per-row Dice minus per-image Dice: " + ", ".join(gap) + ".", ""]
    parts += ["## All metrics (mean over images; 95% percentile-bootstrap interval for Dice and IoU)", ""]
    if result.companion_summaries:
        parts += [f"### {meta['prompt'].get('label', 'auto')}", ""]
    parts += [rep.metrics_markdown(summary, keys), ""]
    for name, comp in result.companion_summaries.items():
        parts += [f"### {meta['companions'][name]}", "", rep.metrics_markdown(comp, keys), ""]
    if result.detection is not None:
        parts += ["## Detection (stage 1 proposals)", "", rep.markdown_table(
            ["Data set", "frames", "with polyp", "proposals", "missed", "false proposals", "correct rejections",
             "false alarms"], [[str(v) for v in r.values()] for r in result.detection.to_dict("records")]),
            "", DETECTION_NOTE, ""]
    if result.robustness is not None:
        base = "per component" if meta["prompt"].get("mode") == "per_component" else "tight box"
        parts += ["## Prompt robustness: Dice against box noise", "",
                  (f"Each box side moves by U(-f, f) x the box side (seed {meta['prompt']['seed']}); "
                   f"base prompt: {base}."), "", rep.robustness_markdown(result.robustness), ""]
        if result.companions:
            parts += [f"`{meta['prompt'].get('label', 'auto')}` needs no box: " + ", ".join(
                f"{rep.SHORT_NAMES.get(s, s)} {v:.3f}" for s, v in _references(result)["auto"].items())
                + ". A human box noisier than where its curve crosses these values loses to it.", ""]
    bad = result.per_image[result.per_image["status"] == "unreadable"]
    if len(bad):
        parts += ["## Unreadable images (scored as failures)", ""]
        parts += [f"- {r['dataset']}/{r['image']}: {r['error']}" for r in bad.to_dict("records")] + [""]
    parts += ["## Conventions", "", f"- {UNREADABLE_CONVENTION}", f"- {EMPTY_GT_CONVENTION}",
              f"- {MAPPING_NOTE}", ""]
    return "\n".join(parts)


def _case_arrays(preds: dict, row: dict) -> dict:
    bits, shape = preds[(row["dataset"], row["image"])]
    pred = np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape).astype(bool)
    return {"image": read_image(row["image_path"]), "gt": read_mask(row["mask_path"]), "pred": pred,
            "boxes": _drawn_boxes(row["box"])}


def _drawn_boxes(text) -> np.ndarray | None:
    """The boxes of a ``box`` cell; clicks (x,y,label) are not drawn."""
    if isinstance(text, str) and text and all(t.count(",") == 3 for t in text.split(";")):
        return figures.parse_boxes(text)
    return None


def _references(result: EvalResult) -> dict[str, dict[str, float]]:
    """Rows drawn across the robustness figure: prompt=auto's per-set Dice."""
    if not result.companions:
        return {}
    return {"auto": {str(r["dataset"]): float(r["dice"]) for r in result.summary.to_dict("records")}}


def write_outputs(result: EvalResult, settings: EvalSettings) -> None:
    out = result.out_dir
    result.per_image.to_csv(out / "per_image.csv", index=False)
    result.summary.to_csv(out / "summary.csv", index=False)
    for name, df in result.companions.items():  # prompt=auto: its stage 1 alone and the oracle box
        df.to_csv(out / f"per_image_{name}.csv", index=False)
        result.companion_summaries[name].to_csv(out / f"summary_{name}.csv", index=False)
    if result.detection is not None:
        result.detection.to_csv(out / "detection.csv", index=False)
    (out / "summary.md").write_text(summary_markdown(result, settings.compat_row_dice))
    if result.robustness is not None:
        result.robustness.to_csv(out / "robustness.csv", index=False)
        (out / "robustness.md").write_text("# Prompt robustness: Dice against box noise\n\n"
                                           + rep.robustness_markdown(result.robustness) + "\n")
    if not settings.figures:
        return
    (out / "figures").mkdir(exist_ok=True)
    if result.robustness is not None:
        figures.robustness_figure(result.robustness, _references(result)).savefig(out / "robustness.png")
    for set_name in result.summary["dataset"]:
        sub = result.per_image[result.per_image["dataset"] == set_name]
        cases = [{**_case_arrays(result.preds, r), "label": f"{tag}: {r['image']}\nDice {r['dice']:.3f}"}
                 for tag, r in figures.pick_cases(sub)]
        if cases:
            fig = figures.cases_figure(cases, f"{set_name}: best, median and worst Dice ({result.meta['label']})")
            fig.savefig(out / "figures" / f"{set_name}.png")


def log_wandb(run, result: EvalResult, max_side: int = 384) -> None:
    """Summary table, per-image table with image + GT/prediction masks, robustness, and the figures."""
    import wandb  # optional at run time: only with logger=wandb

    run.log({"eval/summary": wandb.Table(dataframe=result.summary)})
    cols = ["dataset", "image", "status", "height", "width", *METRICS, "box"]
    table = wandb.Table(columns=[*cols, "overlay"])
    for r in result.per_image.to_dict("records"):
        img = None
        if r["status"] == "ok":
            arr = _case_arrays(result.preds, r)
            h, w = arr["gt"].shape
            k = min(1.0, max_side / max(h, w))
            size = (max(1, round(w * k)), max(1, round(h * k)))
            masks = {name: {"mask_data": cv2.resize(arr[key].astype(np.uint8), size,
                                                    interpolation=cv2.INTER_NEAREST),
                            "class_labels": {1: "polyp"}}
                     for name, key in (("prediction", "pred"), ("ground_truth", "gt"))}
            img = wandb.Image(cv2.resize(arr["image"], size, interpolation=cv2.INTER_AREA), masks=masks)
        table.add_data(*[r[c] for c in cols], img)
    run.log({"eval/per_image": table})
    if result.robustness is not None:
        run.log({"eval/robustness": wandb.Table(dataframe=result.robustness)})
    figs = sorted((result.out_dir / "figures").glob("*.png")) + sorted(result.out_dir.glob("robustness.png"))
    if figs:
        run.log({f"eval/figures/{f.stem}": wandb.Image(str(f)) for f in figs})
    for k, v in result.test_metrics().items():
        run.summary[k] = v


def console_summary(result: EvalResult) -> str:
    lines = [f"\n{result.meta['label']}: per-image Dice / IoU @0.5 (95% CI)"]
    for r in result.summary.to_dict("records"):
        lines.append(f"  {r['dataset']:<20} n={int(r['n_images']):<4} Dice {r['dice']:.4f} "
                     f"[{r['dice_ci_low']:.4f}, {r['dice_ci_high']:.4f}]  IoU {r['iou']:.4f}"
                     + (f"  unreadable {int(r['n_unreadable'])}" if r["n_unreadable"] else ""))
    lines.append(f"outputs: {result.out_dir} ({result.meta['total_seconds']:.0f} s)")
    return "\n".join(lines)
