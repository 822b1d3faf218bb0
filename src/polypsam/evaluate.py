"""``python -m polypsam.evaluate ckpt_path=<run>/checkpoints/best.ckpt data.root=<PraNet root>``.

Evaluates a fine-tuned checkpoint (or, with ``model=<name>`` and no checkpoint, a zero-shot baseline) on
every folder under ``TestDataset/``: per-image metrics at the original resolution, per-set means with
bootstrap intervals, the paper's Table 2 layout, predicted masks, best/median/worst figures and a box-noise
robustness sweep. Each image is encoded once; every prompt variant reuses its embedding (the encoder is the
expensive part).

Conventions (also written into summary.md):
* an image that cannot be decoded is not dropped: it is listed as ``unreadable`` and scored as a total
  failure on every metric (Dice = IoU = mDice = ... = 0, MAE = 1), so the set mean counts it;
* an image whose mask is empty gets no box, hence an empty prediction, and is scored by
  ``metrics.EMPTY_GT_CONVENTION`` (Dice 1 for the correct rejection).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from polypsam import __version__
from polypsam import reporting as rep
from polypsam.config import CONF_DIR
from polypsam.data.dataset import BoxPrompt, Record
from polypsam.data.io import image_size as header_size
from polypsam.data.io import read_image, read_mask
from polypsam.data.transforms import (
    Resize,
    boxes_to_input,
    resize_image,
    to_original,
)
from polypsam.errors import ConfigError, DataError, PolypSamError
from polypsam.metrics import EMPTY_GT_CONVENTION, dice_iou, score_image, summarize
from polypsam.models.sam import PromptableSAM

log = logging.getLogger("polypsam.evaluate")

METRICS = ("dice", "iou", "mean_dice", "mean_iou", "s_measure", "wf_measure", "mean_e_measure",
           "max_e_measure", "mae", "row_dice", "row_iou")
# An unreadable image is a total failure: the worst value of every metric (MAE's worst is 1).
FAILURE_SCORES = {**{k: 0.0 for k in METRICS}, "mae": 1.0}
UNREADABLE_CONVENTION = (
    "Unreadable images: an image file that cannot be decoded is kept in the evaluation, listed as "
    "'unreadable' and scored as a total failure on every metric (Dice = IoU = mDice = mIoU = S = wF = E = "
    "row Dice = 0, MAE = 1), so it lowers the set mean instead of silently leaving it."
)
PROMPT_MODES = ("tight", "jitter", "per_component")


# ----------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class PromptSettings:
    """Box prompts at test time, derived from the ground truth in the original frame."""

    mode: str = "tight"  # tight: oracle box around all foreground | jitter: tight + noise | per_component
    jitter_frac: float = 0.1  # jitter: each side moves by U(-f, f) x the box side
    seed: int = 0
    min_component_area: int = 16

    def __post_init__(self):
        if self.mode not in PROMPT_MODES:
            raise ConfigError(f"prompt.mode={self.mode!r}: choose one of {', '.join(PROMPT_MODES)}.")
        if not 0.0 <= self.jitter_frac <= 1.0:
            raise ConfigError(f"prompt.jitter_frac={self.jitter_frac}: give a fraction of the box side "
                              "in [0, 1].")

    @property
    def base(self) -> str:
        return "per_component" if self.mode == "per_component" else "tight"

    @property
    def noise(self) -> float:
        return self.jitter_frac if self.mode == "jitter" else 0.0

    def describe(self) -> str:
        if self.mode == "jitter":
            return f"jittered tight box (each side +-{self.jitter_frac:g} x box side, seed {self.seed})"
        if self.mode == "per_component":
            return f"one box per connected component (>= {self.min_component_area} px)"
        return "ground-truth tight box (oracle)"


@dataclass
class EvalSettings:
    prompt: PromptSettings = field(default_factory=PromptSettings)
    noise: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2)  # robustness sweep; empty: no sweep
    compat_row_dice: bool = False  # add Polyp-SAM's MONAI per-row Dice to the tables (never the default)
    save_masks: bool = True
    figures: bool = True
    batch_size: int = 4
    num_workers: int = 0
    threshold: float = 0.5
    device: str = "auto"
    bootstrap_seed: int = 0


def box_prompts(mask: np.ndarray, base: str, noise: float, seed: int, key: str,
                min_area: int = 16) -> np.ndarray:
    """(K,4) XYXY boxes in the original frame.

    The noise draw depends only on (seed, noise, image key): a result does not depend on batch size or
    order, and the ``jitter`` prompt equals the robustness sweep at the same noise.
    """
    rng = np.random.default_rng([seed, round(noise * 1e6), zlib.crc32(key.encode())]) if noise > 0 else None
    return BoxPrompt(mode=base, jitter_frac=noise, min_component_area=min_area).boxes(mask, rng)


# ------------------------------------------------------------------------------------------------- data


def _collect_records(root: str | Path, test_sets, limit_test, split_seed: int, image_size: int,
                     generate_demo: bool = False) -> dict[str, list[Record]]:
    """Every TestDataset folder (paper order first), a seeded subset with ``limit_test``: the same records
    that training's test stage sees."""
    from polypsam.data.datamodule import PolypDataModule

    if generate_demo:
        from polypsam.data.demo import generate_demo_dataset

        generate_demo_dataset(root)
    dm = PolypDataModule(root=str(root), test_sets=list(test_sets) if test_sets else None,
                         limit_test=limit_test, split_seed=split_seed, image_size=image_size, num_workers=0)
    dm.setup("test")
    if not dm.test_sets:
        raise DataError(f"{Path(root) / 'TestDataset'}: no test sets found; expected "
                        "TestDataset/<name>/{images,masks} under data.root (python -m polypsam.data.prepare "
                        "builds this layout).")
    return {name: ds.records for name, ds in dm.test_sets.items()}


def _check_sizes(records: list[Record]) -> dict[str, str]:
    """Header check before any model work: a mask of another size is an error, an unreadable image noted."""
    unreadable = {}
    for r in records:
        mh = header_size(r.mask)  # an unreadable mask is an error: without ground truth nothing is scored
        try:
            ih = header_size(r.image)
        except DataError as exc:
            unreadable[r.relpath] = str(exc)
            continue
        if ih != mh:
            raise DataError(f"{r.mask}: mask is {mh[1]}x{mh[0]} but its image {r.image} is {ih[1]}x{ih[0]}; "
                            "masks must have their image's size. Re-export the mask at the image's size or "
                            "remove the pair.")
    return unreadable


class _EvalItems(Dataset):
    """Decoded, resized images and full-resolution masks; decoding failures are returned, not raised."""

    def __init__(self, records: list[Record], image_size: int, known_unreadable: dict[str, str],
                 resize_method: str = "pil_bilinear"):
        self.records, self.image_size, self.known = records, image_size, known_unreadable
        self.resize_method = resize_method  # the model's own preprocessing (ModelSpec.resize_method)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        item: dict[str, Any] = {"index": i, "status": "ok", "error": ""}
        try:
            item["mask"] = read_mask(rec.mask)
        except DataError as exc:
            return {**item, "status": "mask_error", "error": str(exc)}
        if rec.relpath in self.known:
            return {**item, "status": "unreadable", "error": self.known[rec.relpath]}
        try:
            image = read_image(rec.image)
        except DataError as exc:
            return {**item, "status": "unreadable", "error": str(exc)}
        if image.shape[:2] != item["mask"].shape:
            h, w = item["mask"].shape
            return {**item, "status": "mask_error",
                    "error": f"{rec.mask}: mask is {w}x{h} but its image {rec.image} is {image.shape[1]}x"
                             f"{image.shape[0]}; masks must have their image's size."}
        canvas, rz = resize_image(image, self.image_size, self.resize_method)
        item["image"] = torch.from_numpy(canvas).permute(2, 0, 1).contiguous()
        item["resize"] = rz
        return item


def _as_list(items):
    return items


# ---------------------------------------------------------------------------------------------- inference


def resolve_device(device: str) -> torch.device:
    if device in ("auto", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.inference_mode()
def predict_probs(net: PromptableSAM, embeddings: torch.Tensor, resizes: list[Resize],
                  boxes: list[np.ndarray]) -> list[np.ndarray]:
    """Probability maps at each image's original resolution from embeddings and original-frame boxes.

    Logits are mapped back (crop the pad, bilinear to the original size) before the sigmoid, as SAM's
    ``postprocess_masks`` does; images without a box get an all-zero map.
    """
    device = embeddings.device
    boxes_in = [torch.from_numpy(boxes_to_input(b, rz)) for b, rz in zip(boxes, resizes)]
    idx = torch.cat([torch.full((len(b),), j, dtype=torch.long) for j, b in enumerate(boxes_in)])
    if idx.numel() == 0:
        return [np.zeros(rz.original_hw, np.float32) for rz in resizes]
    input_hw = torch.tensor([rz.input_hw for rz in resizes], device=device)
    logits, _ = net(None, input_hw, torch.cat(boxes_in).float().to(device), idx.to(device),
                    embeddings=embeddings)
    out = []
    for j, rz in enumerate(resizes):
        if not (idx == j).any():
            out.append(np.zeros(rz.original_hw, np.float32))
            continue
        out.append(torch.sigmoid(to_original(logits[j, 0].float(), rz)).cpu().numpy())
    return out


def _fmt_boxes(boxes: np.ndarray) -> str:
    return ";".join(",".join(f"{v:.1f}" for v in b) for b in boxes)


@dataclass
class EvalResult:
    out_dir: Path
    summary: pd.DataFrame
    per_image: pd.DataFrame
    robustness: pd.DataFrame | None
    meta: dict

    def test_metrics(self) -> dict[str, float]:
        """``test/<set>/dice`` and ``test/<set>/iou``, the keys training writes to results.json."""
        out = {}
        for r in self.summary.to_dict("records"):
            out[f"test/{r['dataset']}/dice"] = float(r["dice"])
            out[f"test/{r['dataset']}/iou"] = float(r["iou"])
        return out


def _unreadable_row(set_name: str, rec: Record, item: dict, noise_levels: list[float]) -> dict:
    h, w = item["mask"].shape
    return {"dataset": set_name, "image": rec.name, "status": "unreadable", "height": h, "width": w,
            **FAILURE_SCORES, "n_boxes": 0, "box": "", "error": item["error"], "image_path": str(rec.image),
            "mask_path": str(rec.mask), "pred_mask": None,
            **{f"dice_noise_{n:g}": 0.0 for n in noise_levels}}


def _evaluate_batch(net: PromptableSAM, ok: list[dict], recs: list[Record], set_name: str,
                    settings: EvalSettings, noise_levels: list[float], out: Path, preds: dict) -> list[dict]:
    """Encode the batch once; decode the main prompt and every sweep point from those embeddings; score."""
    p = settings.prompt
    device = next(net.parameters()).device
    resizes = [it["resize"] for it in ok]
    keys = [f"{set_name}/{recs[it['index']].name}" for it in ok]
    with torch.inference_mode():
        images = torch.stack([it["image"] for it in ok]).to(device)
        emb = net.encode(images, torch.tensor([rz.input_hw for rz in resizes], device=device))

    def boxes_at(noise: float) -> list[np.ndarray]:
        return [box_prompts(it["mask"], p.base, noise, p.seed, k, p.min_component_area)
                for it, k in zip(ok, keys)]

    main_boxes = boxes_at(p.noise)
    probs = predict_probs(net, emb, resizes, main_boxes)
    sweep: dict[float, list[float]] = {}
    for n in noise_levels:
        # the main prompt is the sweep point at its own noise: same boxes, same draw
        pn = probs if n == p.noise else predict_probs(net, emb, resizes, boxes_at(n))
        sweep[n] = [dice_iou(pr > settings.threshold, it["mask"])[0] for pr, it in zip(pn, ok)]
    rows = []
    for j, (it, prob, boxes) in enumerate(zip(ok, probs, main_boxes)):
        rec = recs[it["index"]]
        binary = prob > settings.threshold
        scores = score_image(prob, it["mask"], threshold=settings.threshold)
        rel_mask = None
        if settings.save_masks:
            rel_mask = f"masks/{set_name}/{rec.name}.png"
            (out / rel_mask).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(binary.astype(np.uint8) * 255).save(out / rel_mask)
        preds[(set_name, rec.name)] = (np.packbits(binary), binary.shape)
        h, w = binary.shape
        rows.append({"dataset": set_name, "image": rec.name, "status": "ok", "height": h, "width": w,
                     **scores, "n_boxes": len(boxes), "box": _fmt_boxes(boxes), "error": "",
                     "image_path": str(rec.image), "mask_path": str(rec.mask), "pred_mask": rel_mask,
                     **{f"dice_noise_{n:g}": sweep[n][j] for n in noise_levels}})
    return rows


def _summaries(per_image: pd.DataFrame, set_names, noise_levels: list[float], seed: int
               ) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    summary_rows, robust_rows = [], []
    for set_name in set_names:
        sub = per_image[per_image["dataset"] == set_name]
        stats = summarize(sub[list(METRICS)].to_dict("records"), keys=METRICS, seed=seed)
        bad = sub[sub["status"] == "unreadable"]["image"].tolist()
        summary_rows.append({"dataset": set_name, "n_images": int(stats.pop("n_images")),
                             "n_unreadable": len(bad), **stats, "unreadable": ";".join(bad)})
        for n in noise_levels:
            col = sub[f"dice_noise_{n:g}"].to_numpy(float)
            r = summarize([{"dice": v} for v in col], keys=["dice"], seed=seed)
            robust_rows.append({"dataset": set_name, "noise": n, "dice": r["dice"],
                                "dice_ci_low": r["dice_ci_low"], "dice_ci_high": r["dice_ci_high"],
                                "n_images": int(r["n_images"])})
    return pd.DataFrame(summary_rows), (pd.DataFrame(robust_rows) if robust_rows else None)


def evaluate_model(net: PromptableSAM, root: str | Path, out_dir: str | Path,
                   settings: EvalSettings | None = None, test_sets=None, limit_test: int | None = None,
                   split_seed: int = 42, identity: dict | None = None, wandb_run=None,
                   generate_demo: bool = False, verbose: bool = True) -> EvalResult:
    """Evaluate ``net`` on every test set under ``root`` and write every output into ``out_dir``."""
    settings = settings or EvalSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    device = resolve_device(settings.device)
    net = net.to(device).eval()
    s = net.spec.image_size
    record_sets = _collect_records(root, test_sets, limit_test, split_seed, s, generate_demo)
    unreadable_known = {}
    for recs in record_sets.values():
        unreadable_known.update(_check_sizes(recs))

    noise_levels = [float(n) for n in settings.noise]
    rows: list[dict] = []
    preds: dict = {}  # (set, image) -> packed binary mask and shape, for the figures and W&B
    compute_seconds = 0.0  # model and scoring, without data loading
    for set_name, recs in record_sets.items():
        items = _EvalItems(recs, s, unreadable_known, getattr(net.spec, "resize_method", "pil_bilinear"))
        loader = DataLoader(items, batch_size=settings.batch_size, shuffle=False,
                            num_workers=settings.num_workers, collate_fn=_as_list)
        set_t0 = time.perf_counter()
        for batch in loader:
            ok = []
            for it in batch:
                if it["status"] == "mask_error":
                    raise DataError(it["error"])
                if it["status"] == "unreadable":
                    log.warning("unreadable image, scored as a failure: %s", it["error"])
                    rows.append(_unreadable_row(set_name, recs[it["index"]], it, noise_levels))
                else:
                    ok.append(it)
            if ok:
                t0 = time.perf_counter()
                rows += _evaluate_batch(net, ok, recs, set_name, settings, noise_levels, out, preds)
                compute_seconds += time.perf_counter() - t0
        if verbose:
            print(f"[evaluate] {set_name}: {len(recs)} images in {time.perf_counter() - set_t0:.1f} s",
                  flush=True)

    per_image = pd.DataFrame(rows)
    summary, robustness = _summaries(per_image, record_sets, noise_levels, settings.bootstrap_seed)
    identity = {"model": net.spec.name, "strategy": "zero-shot", "split": "none", "checkpoint": None,
                **(identity or {})}
    p = settings.prompt
    meta = {**identity, "label": _label(identity), "polypsam_version": __version__, "data_root": str(root),
            "prompt": {**asdict(p), "description": p.describe()}, "robustness_noise": noise_levels,
            "compat_row_dice": settings.compat_row_dice, "threshold": settings.threshold,
            "limit_test": limit_test, "split_seed": split_seed, "device": str(device),
            "test_sets": {n: len(r) for n, r in record_sets.items()}, "n_images": len(per_image),
            "n_unreadable": int((per_image["status"] == "unreadable").sum()),
            "compute_seconds": round(compute_seconds, 2)}
    result = EvalResult(out, summary, per_image, robustness, meta)
    meta["wall_seconds"] = round(time.perf_counter() - t_start, 2)  # inference and scoring
    _write_outputs(result, settings, preds)
    if wandb_run is not None:
        _log_wandb(wandb_run, result, preds)
    meta["total_seconds"] = round(time.perf_counter() - t_start, 2)  # with figures and logging
    (out / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    if verbose:
        print(_console_summary(result), flush=True)
    return result


def _label(identity: dict) -> str:
    if identity.get("strategy") in (None, "zero-shot"):
        return f"{identity['model']} zero-shot"
    return f"{identity['model']} {identity['strategy']} ({identity.get('split', '?')})"


# ------------------------------------------------------------------------------------------------ outputs


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
             f"- unreadable images: {meta['n_unreadable']}", "",
             "## Table 2 layout (DSC / mIoU)", "",
             rep.table2_markdown(our_table2_rows(summary, meta["label"], compat_row_dice)), "",
             QUOTED_NOTE, ""]
    if compat_row_dice:
        gap = [f"{rep.SHORT_NAMES.get(r['dataset'], r['dataset'])} {r['row_dice'] - r['dice']:+.3f}"
               for r in summary.to_dict("records")]
        parts += ["Compatibility mode: per-row Dice minus per-image Dice: " + ", ".join(gap) + ".", ""]
    parts += ["## All metrics (mean over images; 95% percentile-bootstrap interval for Dice and IoU)", "",
              rep.metrics_markdown(summary, keys), ""]
    if result.robustness is not None:
        base = "per component" if meta["prompt"]["mode"] == "per_component" else "tight box"
        parts += ["## Prompt robustness: Dice against box noise", "",
                  (f"Each box side moves by U(-f, f) x the box side (seed {meta['prompt']['seed']}); "
                   f"base prompt: {base}."), "", rep.robustness_markdown(result.robustness), ""]
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
            "boxes": rep.parse_boxes(row["box"])}


def _write_outputs(result: EvalResult, settings: EvalSettings, preds: dict) -> None:
    out = result.out_dir
    result.per_image.to_csv(out / "per_image.csv", index=False)
    result.summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(summary_markdown(result, settings.compat_row_dice))
    if result.robustness is not None:
        result.robustness.to_csv(out / "robustness.csv", index=False)
        (out / "robustness.md").write_text("# Prompt robustness: Dice against box noise\n\n"
                                           + rep.robustness_markdown(result.robustness) + "\n")
    if not settings.figures:
        return
    (out / "figures").mkdir(exist_ok=True)
    if result.robustness is not None:
        rep.robustness_figure(result.robustness).savefig(out / "robustness.png")
    for set_name in result.summary["dataset"]:
        sub = result.per_image[result.per_image["dataset"] == set_name]
        cases = [{**_case_arrays(preds, r), "label": f"{tag}: {r['image']}\nDice {r['dice']:.3f}"}
                 for tag, r in rep.pick_cases(sub)]
        if cases:
            fig = rep.cases_figure(cases, f"{set_name}: best, median and worst Dice ({result.meta['label']})")
            fig.savefig(out / "figures" / f"{set_name}.png")


def _log_wandb(run, result: EvalResult, preds: dict, max_side: int = 384) -> None:
    """Summary table, per-image table with image + GT/prediction masks, robustness, and the figures."""
    import cv2
    import wandb

    run.log({"eval/summary": wandb.Table(dataframe=result.summary)})
    cols = ["dataset", "image", "status", "height", "width", *METRICS, "box"]
    table = wandb.Table(columns=[*cols, "overlay"])
    for r in result.per_image.to_dict("records"):
        img = None
        if r["status"] == "ok":
            arr = _case_arrays(preds, r)
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


def _console_summary(result: EvalResult) -> str:
    lines = [f"\n{result.meta['label']}: per-image Dice / IoU @0.5 (95% CI)"]
    for r in result.summary.to_dict("records"):
        lines.append(f"  {r['dataset']:<20} n={int(r['n_images']):<4} Dice {r['dice']:.4f} "
                     f"[{r['dice_ci_low']:.4f}, {r['dice_ci_high']:.4f}]  IoU {r['iou']:.4f}"
                     + (f"  unreadable {int(r['n_unreadable'])}" if r["n_unreadable"] else ""))
    lines.append(f"outputs: {result.out_dir} ({result.meta['total_seconds']:.0f} s)")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- entry points


def _run_identity(meta: dict, ckpt_path: str | Path) -> dict:
    """backbone x strategy x split of a training checkpoint, for the compare table."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = meta.get("config") or {}
    data = cfg.get("data") or {}
    split = "+".join(data.get("train_dirs") or []) or "?"
    hydra_file = Path(ckpt_path).resolve().parent.parent / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        try:  # the data config's name (pranet, colondb_cvc300, ...) when the run folder has Hydra's record
            choice = OmegaConf.load(hydra_file).hydra.runtime.choices.get("data")
        except (OSError, OmegaConfBaseException, AttributeError) as exc:
            log.debug("cannot read %s: %s", hydra_file, exc)
            choice = None
        if choice:
            split = f"{choice}:{split}"
    if data.get("split_file"):
        split += f" (split {Path(data['split_file']).name})"
    return {"model": meta["model"], "strategy": (cfg.get("strategy") or {}).get("name", "fine-tuned"),
            "split": split, "checkpoint": str(Path(ckpt_path).resolve()), "task_name": cfg.get("task_name")}


def settings_from_cfg(cfg, num_workers: int | None = None) -> EvalSettings:
    """EvalSettings from conf/eval.yaml's keys (prompt, robustness, compat_row_dice, ...)."""
    from omegaconf import OmegaConf

    def plain(x) -> dict:
        return OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else dict(x or {})

    pr, rob = plain(cfg.get("prompt")), plain(cfg.get("robustness"))
    if num_workers is None:
        num_workers = (cfg.get("data") or {}).get("num_workers", 0)
    noise = rob.get("noise")
    return EvalSettings(
        prompt=PromptSettings(**pr),
        noise=EvalSettings.noise if noise is None else tuple(float(n) for n in noise),
        compat_row_dice=bool(cfg.get("compat_row_dice", False)), save_masks=bool(cfg.get("save_masks", True)),
        figures=bool(cfg.get("figures", True)), batch_size=int(cfg.get("batch_size", 4)),
        num_workers=int(num_workers), threshold=float(cfg.get("threshold", 0.5)),
        device=str(cfg.get("device", "auto")))


def _wandb_from_cfg(cfg, out: Path, identity: dict):
    """A W&B run when the composed logger group has a wandb entry (logger=wandb), else None."""
    wb = (cfg.get("logger") or {}).get("wandb")
    if not wb:
        return None
    import wandb
    from omegaconf import OmegaConf

    return wandb.init(project=wb.get("project", "polypsam"), name=wb.get("name"), group=wb.get("group"),
                      tags=list(wb.get("tags") or []), dir=str(out), job_type="eval",
                      mode="offline" if wb.get("offline") else None,
                      config={"eval": OmegaConf.to_container(cfg, resolve=True), **identity})


def _data_kwargs(cfg) -> dict:
    return {"test_sets": cfg.data.get("test_sets"), "limit_test": cfg.data.get("limit_test"),
            "split_seed": int(cfg.data.get("split_seed", 42))}


def evaluate(cfg) -> EvalResult:
    """The Hydra task: a checkpoint (``ckpt_path``) or a zero-shot model (``model=<name>``)."""
    from polypsam.checkpoints import load_model
    from polypsam.config import model_from_cfg
    from polypsam.models import available_models

    out = Path(cfg.paths.output_dir)
    settings = settings_from_cfg(cfg)
    model_cfg = cfg.get("model")
    ckpt = cfg.get("ckpt_path")
    if ckpt:
        net, meta = load_model(ckpt, expected_model=model_cfg.name if model_cfg else None)
        identity = _run_identity(meta, ckpt)
    elif model_cfg:
        net = model_from_cfg(model_cfg)
        identity = {"model": model_cfg.name, "strategy": "zero-shot", "split": "none", "checkpoint": None}
    else:
        raise ConfigError("nothing to evaluate: give ckpt_path=<run>/checkpoints/best.ckpt, or model=<name> "
                          f"for a zero-shot baseline (registered models: {', '.join(available_models())}).")
    run = _wandb_from_cfg(cfg, out, identity)
    try:
        return evaluate_model(net, cfg.data.root, out, settings, identity=identity, wandb_run=run,
                              generate_demo=bool(cfg.data.get("generate_demo")), **_data_kwargs(cfg))
    finally:
        if run is not None:
            run.finish()


def evaluate_after_training(cfg, best_checkpoint: str | Path, out_dir: str | Path,
                            trainer=None) -> EvalResult:
    """What ``train`` runs on global rank 0 after fitting: the same evaluation on the best checkpoint.

    Settings come from an optional ``eval:`` block of the training config (the keys of conf/eval.yaml);
    the device is the trainer's; a W&B run opened by the trainer's WandbLogger receives the tables.
    """
    from omegaconf import OmegaConf

    from polypsam.checkpoints import load_model

    block = cfg.get("eval")
    ecfg = OmegaConf.create(OmegaConf.to_container(block, resolve=True) if block is not None else {})
    settings = settings_from_cfg(ecfg, num_workers=int(cfg.data.get("num_workers", 0)))
    if trainer is not None and not ecfg.get("device"):
        settings.device = str(trainer.strategy.root_device)
    net, meta = load_model(best_checkpoint)
    run = None
    for lg in (trainer.loggers if trainer is not None else []):
        if lg.__class__.__name__ == "WandbLogger":
            run = lg.experiment
    return evaluate_model(net, cfg.data.root, out_dir, settings, wandb_run=run,
                          identity=_run_identity(meta, best_checkpoint), **_data_kwargs(cfg))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg) -> float | None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        result = evaluate(cfg)
    except PolypSamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    return float(result.summary["dice"].mean())


if __name__ == "__main__":
    main()
