"""Predict a plan through the inference layer and write a mask, an overlay and a JSON record per image."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from polypsam.cli import one_line
from polypsam.data.io import read_mask_report
from polypsam.devices import resolve_device
from polypsam.errors import ConfigError
from polypsam.inference import AutoPredictor, ImageItems, Prediction, Predictor, as_list
from polypsam.models.sam import PromptableSAM
from polypsam.prediction.plan import Job, Plan
from polypsam.progress import count_bar
from polypsam.prompts import PromptType
from polypsam.reporting.drawing import overlay
from polypsam.runtime import RuntimeSettings, build_frozen_encoder, describe


def _write_outputs(job: Job, out: Path, pred: Prediction, threshold: float, seconds: dict,
                   original: np.ndarray | None, identity: dict, stage1: Prediction | None = None) -> dict:
    """Mask, overlay and the JSON record; ``seconds`` gains the time spent here ("write") and "total"."""
    t0 = time.perf_counter()
    mask = pred.prob > threshold
    (out / "masks").mkdir(exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(out / "masks" / f"{job.stem}.png")
    record = {
        "image": str(job.image), "size": {"height": job.hw[0], "width": job.hw[1]},
        **pred.prompts.as_json(), "coordinates": "original-image pixels; boxes xyxy, points xy",
        "prompt": job.source, "predicted_iou": [round(float(v), 4) for v in pred.iou],
        "foreground_fraction": round(float(mask.mean()), 6), "threshold": threshold,
        "mask": f"masks/{job.stem}.png", "seconds": seconds, **identity,
    }
    if job.mask is not None:
        record["prompt_mask"] = str(job.mask)
        record["prompt_mask_nonbinary_pixels"] = job.nonbinary_pixels
    if original is not None:
        gt = read_mask_report(job.mask).mask if job.mask is not None else np.zeros(mask.shape, bool)
        (out / "overlays").mkdir(exist_ok=True)
        Image.fromarray(overlay(original, gt, mask, pred.prompts.boxes)).save(
            out / "overlays" / f"{job.stem}.jpg", quality=90)
        record["overlay"] = f"overlays/{job.stem}.jpg"
    if stage1 is not None:  # prompt=auto: boxes and scores above are the proposals; none is a miss
        record["proposals"] = len(pred.prompts)
        record["stage1_foreground_fraction"] = round(float((stage1.prob > threshold).mean()), 6)
    seconds["write"] = round(time.perf_counter() - t0, 4)
    seconds["total"] = round(seconds["model"] + seconds["write"], 4)
    (out / "json").mkdir(exist_ok=True)
    (out / "json" / f"{job.stem}.json").write_text(json.dumps(record, indent=1))
    return record


def run_prediction(net: PromptableSAM, plan: Plan, out_dir: str | Path, identity: dict | None = None,
                   batch_size: int = 8, num_workers: int = 0, device: str | torch.device = "auto",
                   precision: str = "32", threshold: float = 0.5, overlays: bool = True,
                   progress: bool = True, prompt: PromptType | None = None,
                   proposer: PromptableSAM | None = None, runtime: RuntimeSettings | None = None) -> dict:
    """Predict every job of ``plan`` in batches; writes the per-image files and ``summary.json``.

    ``prompt=auto`` (``prompt.from_model``) proposes each image's boxes with ``proposer`` (default: ``net``).
    ``runtime``: the image encoder's runtime (``model.runtime``; default torch).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: must be at least 1.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    predictor = Predictor(net, device, precision, build_frozen_encoder(net, runtime or RuntimeSettings(), device))
    auto = AutoPredictor(predictor, prompt, proposer) if prompt is not None and prompt.from_model else None
    identity = dict(identity or {})
    items = ImageItems([j.image for j in plan.jobs], net.spec, keep_image=overlays,
                       proposer_spec=auto.proposer_spec if auto else None)
    loader = DataLoader(items, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=as_list)
    done, model_seconds = 0, 0.0
    t_start = time.perf_counter()
    with count_bar(progress) as bar:
        task = bar.add_task("predicting", total=len(plan.jobs))
        for batch in loader:
            good = [it for it in batch if it["status"] == "ok"]
            for it in batch:
                if it["status"] != "ok":
                    plan.skip("unreadable", f"{plan.jobs[it['index']].image} ({one_line(it['error'])})")
                    bar.advance(task)
            if not good:
                continue
            t0 = time.perf_counter()
            jobs = [plan.jobs[it["index"]] for it in good]
            canvases, resizes = torch.stack([it["canvas"] for it in good]), [it["resize"] for it in good]
            stage1 = [None] * len(good)
            if auto is not None:
                two = auto.predict(canvases, resizes, auto.stage1_canvases(good))
                preds, stage1 = two.refined, two.proposal
            else:
                preds = predictor.predict(canvases, resizes, [j.prompts for j in jobs])
            t_model = time.perf_counter() - t0
            model_seconds += t_model
            for job, it, pred, first in zip(jobs, good, preds, stage1):
                # the batch's model time is shared equally by its images
                seconds = {"model": round(t_model / len(good), 4), "batch": round(t_model, 4),
                           "batch_size": len(good)}
                _write_outputs(job, out, pred, threshold, seconds, it.get("image"), identity, first)
                done += 1
                bar.advance(task)
    wall = time.perf_counter() - t_start
    summary = {
        **identity, "predicted": done, "skipped": {k: len(v) for k, v in plan.skipped.items()},
        "skipped_files": plan.skipped, "unused_prompts": plan.unused_prompts,
        "prompt_mask_nonbinary_pixels": int(sum(j.nonbinary_pixels for j in plan.jobs)),
        "device": str(predictor.device), "precision": str(precision),
        "encoder_runtime": describe(predictor.encoder), "batch_size": batch_size,
        "threshold": threshold, "seconds": round(wall, 3), "seconds_per_image": round(wall / done, 4) if done else None,
        "model_seconds_per_image": round(model_seconds / done, 4) if done else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
