"""``python -m polypsam.predict``: masks for your own images from box prompts.

    python -m polypsam.predict ckpt_path=<run>/checkpoints/best.ckpt input=<folder|image> \\
        prompts=<boxes.json|boxes.csv|masks folder> output=<folder>
    python -m polypsam.predict model=lite input=<image> 'box=[x0,y0,x1,y1]' output=<folder>   # zero-shot

Per image: ``masks/<stem>.png`` (0/255, original size), ``overlays/<stem>.jpg`` (prediction red, prompt
mask green, boxes yellow) and ``json/<stem>.json`` (boxes, predicted IoU, seconds); ``summary.json``
for the run. Boxes are XYXY in original-image pixels. An image that cannot be decoded, or has no
prompt, is skipped and listed; a box outside its image, or of zero area, is an error naming the image.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from polypsam.config import CONF_DIR
from polypsam.data.io import IMAGE_EXTENSIONS, image_size, read_image, read_mask_report
from polypsam.data.transforms import (
    box_from_mask,
    boxes_per_component,
    boxes_to_input,
    resize_image,
    to_original,
)
from polypsam.errors import ConfigError, DataError, PolypSamError
from polypsam.faults import one_line
from polypsam.models.registry import available_models
from polypsam.models.sam import PromptableSAM

log = logging.getLogger("polypsam.predict")


@dataclass
class Job:
    """One image and the boxes it is prompted with (original-image pixels)."""

    image: Path
    boxes: np.ndarray  # (K, 4) float32 XYXY
    prompt: str  # where the boxes came from
    hw: tuple[int, int] = (0, 0)
    mask: Path | None = None  # prompt mask (outlined in the overlay)
    nonbinary_pixels: int = 0  # prompt-mask pixels thresholding had to decide

    @property
    def stem(self) -> str:
        return self.image.stem


@dataclass
class Plan:
    jobs: list[Job]
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> files
    unused_prompts: list[str] = field(default_factory=list)  # prompt keys without an image

    def skip(self, reason: str, item: str) -> None:
        self.skipped.setdefault(reason, []).append(item)


# -- inputs and prompts ------------------------------------------------------------------------------------


def list_images(path: str | Path) -> list[Path]:
    """The image itself, or every image directly in the folder, sorted; file stems must be unique."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(f"{path}: not an image file name (expected {', '.join(IMAGE_EXTENSIONS)}); give an "
                            "image or a folder of images as input=.")
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: input does not exist; give an image file or a folder of images as input=.")
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"{path}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}).")
    _check_unique_stems(path, files)
    return files


def _check_unique_stems(folder: Path, files: list[Path]) -> None:
    seen: dict[str, Path] = {}
    dupes = []
    for p in files:
        if p.stem in seen:
            dupes.append(f"{seen[p.stem].name} / {p.name}")
        seen.setdefault(p.stem, p)
    if dupes:
        raise DataError(f"{folder}: several files share a stem, so outputs and prompts would be ambiguous: "
                        f"{', '.join(dupes[:10])}. Keep one file per stem.")


def _key(name: str) -> str:
    """A prompt key as a file stem: 'x.jpg' and 'x' both name the image x.*; a path keeps its last part."""
    name = Path(str(name).strip()).name
    p = Path(name)
    return p.stem if p.suffix.lower() in IMAGE_EXTENSIONS else name


def _by_key(table: dict[str, list[list[float]]], source: Path) -> dict[str, list[list[float]]]:
    out: dict[str, list[list[float]]] = {}
    origin: dict[str, str] = {}
    for name, boxes in table.items():
        k = _key(name)
        if k in out:
            raise DataError(f"{source}: entries {origin[k]!r} and {name!r} name the same image {k!r}; keep one.")
        out[k], origin[k] = [list(map(float, b)) for b in boxes], name
    return out


def load_boxes_json(path: Path) -> dict[str, list[list[float]]]:
    """``{"<stem or file name>": [[x0,y0,x1,y1], ...]}`` or Kvasir-SEG's ``kavsir_bboxes.json``."""
    from polypsam.data.prepare import load_kvasir_boxes

    return _by_key(load_kvasir_boxes(path), path)


def load_boxes_csv(path: Path) -> dict[str, list[list[float]]]:
    """Rows ``image,x0,y0,x1,y1`` with a header; several rows for one image are several boxes."""
    need = ("image", "x0", "y0", "x1", "y1")
    table: dict[str, list[list[float]]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            if not set(need) <= set(cols):
                raise DataError(f"{path}: needs a header with the columns {','.join(need)} (found "
                                f"{','.join(cols) or 'none'}); one row per box.")
            for line, row in enumerate(reader, start=2):
                row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
                if not any(row.values()):
                    continue
                try:
                    box = [float(row[c]) for c in need[1:]]
                except ValueError:
                    raise DataError(f"{path}: line {line}: box {[row[c] for c in need[1:]]} is not four numbers."
                                    ) from None
                if not row["image"]:
                    raise DataError(f"{path}: line {line}: the image column is empty.")
                table.setdefault(_key(row["image"]), []).append(box)  # rows add up, however the image is named
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the CSV file ({exc}).") from None
    return table


def check_box(box, hw: tuple[int, int], image: Path, source: str) -> np.ndarray:
    """A user-given box as float32 XYXY, or an error naming the image: outside it, or of zero area."""
    b = np.asarray(box, dtype=np.float64).reshape(-1)
    h, w = hw
    if b.size != 4 or not np.isfinite(b).all():
        raise DataError(f"{image}: box {list(box)} from {source} is not four finite numbers [x0, y0, x1, y1].")
    x0, y0, x1, y1 = b
    if x1 <= x0 or y1 <= y0:
        raise DataError(f"{image}: box {b.tolist()} from {source} has zero area; boxes are [x0, y0, x1, y1] with "
                        "x1 > x0 and y1 > y0, in original-image pixels.")
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        raise DataError(f"{image}: box {b.tolist()} from {source} is outside the image ({w}x{h} pixels); boxes "
                        f"are [x0, y0, x1, y1] in original-image pixels, within 0..{w} and 0..{h}.")
    return b.astype(np.float32)


def _header_sizes(images: list[Path], plan: Plan, single: bool) -> dict[Path, tuple[int, int]]:
    sizes = {}
    for p in images:
        try:
            sizes[p] = image_size(p)
        except DataError as exc:
            if single:
                raise
            plan.skip("unreadable", f"{p} ({one_line(exc)})")
    return sizes


def _mask_files(folder: Path) -> dict[str, Path]:
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
    _check_unique_stems(folder, files)
    return {p.stem: p for p in files}


def plan_jobs(input: str | Path, prompts: str | Path | None = None, box=None, box_mode: str = "tight",
              min_component_area: int = 16, limit: int | None = None) -> Plan:
    """Every image with its boxes, checked against the image size before any model is loaded."""
    images = list_images(input)
    if limit is not None:
        images = images[:max(0, int(limit))]  # the first images by name: a quick look at a big folder
    single = Path(input).expanduser().is_file()
    plan = Plan([])
    if box_mode not in ("tight", "per_component"):
        raise ConfigError(f"box_mode={box_mode!r}: choose tight or per_component.")
    if prompts is not None and box is not None:
        raise ConfigError("give either prompts=<boxes.json|boxes.csv|masks folder> or box=[x0,y0,x1,y1], not both.")
    if prompts is None and box is None:
        raise ConfigError("SAM needs a box per image: give prompts=<boxes.json|boxes.csv|masks folder>, or "
                          "box=[x0,y0,x1,y1] for a single image.")
    sizes = _header_sizes(images, plan, single)
    if box is not None:
        if not single:
            raise ConfigError(f"box= is for a single image, but input={input} is a folder; give "
                              "prompts=<boxes.json|boxes.csv> with a box per image.")
        boxes = box if box and isinstance(box[0], (list, tuple)) else [box]
        img = images[0]
        plan.jobs.append(Job(img, np.stack([check_box(b, sizes[img], img, "box=") for b in boxes]), "box=",
                             sizes[img]))
        return plan
    src = Path(prompts).expanduser()
    if src.is_dir():
        masks = _mask_files(src)
        for img in images:
            if img not in sizes:
                continue
            m = masks.get(img.stem)
            if m is None:
                plan.skip("no_prompt", str(img))
                continue
            rep = read_mask_report(m)  # an unreadable prompt mask is an error naming it
            if rep.mask.shape != sizes[img]:
                raise DataError(f"{m}: mask is {rep.mask.shape[1]}x{rep.mask.shape[0]} but its image {img} is "
                                f"{sizes[img][1]}x{sizes[img][0]}; a prompt mask must have its image's size.")
            if box_mode == "per_component":
                boxes = boxes_per_component(rep.mask, min_component_area)
            else:
                b = box_from_mask(rep.mask)
                boxes = np.zeros((0, 4), np.float32) if b is None else b[None]
            if len(boxes) == 0:
                plan.skip("empty_prompt_mask", str(m))
                continue
            plan.jobs.append(Job(img, boxes.astype(np.float32), f"mask {m.name} ({box_mode})", sizes[img], m,
                                 rep.nonbinary_pixels))
        if limit is None:
            plan.unused_prompts = sorted(set(masks) - {p.stem for p in images})
        return plan
    if not src.is_file():
        raise DataError(f"{src}: prompts file or folder does not exist; give boxes.json, boxes.csv or a folder "
                        "of masks.")
    if src.suffix.lower() == ".json":
        table = load_boxes_json(src)
    elif src.suffix.lower() == ".csv":
        table = load_boxes_csv(src)
    else:
        raise DataError(f"{src}: unknown prompts format; give a .json ({{\"<stem>\": [[x0,y0,x1,y1], ...]}}), a .csv "
                        "(image,x0,y0,x1,y1 rows) or a folder of masks.")
    for img in images:
        if img not in sizes:
            continue
        rows = table.get(img.stem)
        if not rows:
            plan.skip("no_prompt", str(img))
            continue
        plan.jobs.append(Job(img, np.stack([check_box(b, sizes[img], img, src.name) for b in rows]), src.name,
                             sizes[img]))
    if limit is None:
        plan.unused_prompts = sorted(set(table) - {p.stem for p in images})
    return plan


# -- the model ---------------------------------------------------------------------------------------------


def load_network(ckpt_path: str | None, model_cfg: DictConfig | None) -> tuple[PromptableSAM, dict[str, Any]]:
    """A fine-tuned checkpoint (a run directory means its best.ckpt), or a registered model zero-shot."""
    name = model_cfg.name if model_cfg is not None else None
    if ckpt_path:
        from polypsam.checkpoints import load_model

        path = Path(ckpt_path).expanduser()
        if path.is_dir():
            path = (path if path.name == "checkpoints" else path / "checkpoints") / "best.ckpt"
        attention = model_cfg.get("attention", "sdpa") if model_cfg is not None else "sdpa"
        net, meta = load_model(path, expected_model=name, attention=attention)
        return net, {"model": meta["model"], "checkpoint": str(path), "zero_shot": False}
    if name is None:
        raise ConfigError(f"give ckpt_path=<a polypsam checkpoint or run directory>, or model=<name> for a zero-shot "
                          f"prediction (registered: {', '.join(available_models())}).")
    from polypsam.config import model_from_cfg

    return model_from_cfg(model_cfg).eval(), {"model": name, "checkpoint": None, "zero_shot": True}


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device}: no CUDA GPU is visible here; use device=cpu or device=auto.")
    return dev


def _autocast(device: torch.device, precision: str):
    precision = str(precision)
    if precision in ("32", "32-true", "fp32"):
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16, "16": torch.float16, "16-mixed": torch.float16,
             "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ConfigError(f"precision={precision}: choose 32, bf16 or 16.")
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("precision=16 needs a GPU; use precision=32 or bf16 on the CPU.")
    return torch.autocast(device.type, dtype=dtype)


# -- reading, in loader workers -----------------------------------------------------------------------------


class _JobImages(Dataset):
    def __init__(self, jobs: list[Job], image_size: int, resize_method: str, keep_image: bool):
        self.jobs, self.size, self.method, self.keep = jobs, image_size, resize_method, keep_image

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        job = self.jobs[i]
        try:
            image = read_image(job.image)
        except DataError as exc:  # truncated or corrupt: skipped and reported, the rest goes on
            return {"index": i, "error": one_line(exc)}
        canvas, rz = resize_image(image, self.size, self.method)
        item = {"index": i, "image": torch.from_numpy(canvas).permute(2, 0, 1).contiguous(), "resize": rz,
                "boxes": torch.from_numpy(boxes_to_input(job.boxes, rz))}
        if self.keep:
            item["original"] = image
        return item


def _as_list(items):
    return items


# -- writing -----------------------------------------------------------------------------------------------


def _write_outputs(job: Job, out: Path, prob: np.ndarray, threshold: float, iou: list[float], seconds: dict,
                   original: np.ndarray | None, identity: dict) -> dict:
    """Mask, overlay and the JSON record; ``seconds`` gains the time spent here ("write") and "total"."""
    t0 = time.perf_counter()
    pred = prob > threshold
    (out / "masks").mkdir(exist_ok=True)
    Image.fromarray(pred.astype(np.uint8) * 255, mode="L").save(out / "masks" / f"{job.stem}.png")
    record = {
        "image": str(job.image), "size": {"height": job.hw[0], "width": job.hw[1]},
        "boxes": [[round(float(v), 2) for v in b] for b in job.boxes], "box_format": "xyxy, original-image pixels",
        "prompt": job.prompt, "predicted_iou": [round(float(v), 4) for v in iou],
        "foreground_fraction": round(float(pred.mean()), 6), "threshold": threshold,
        "mask": f"masks/{job.stem}.png", "seconds": seconds, **identity,
    }
    if job.mask is not None:
        record["prompt_mask"] = str(job.mask)
        record["prompt_mask_nonbinary_pixels"] = job.nonbinary_pixels
    if original is not None:
        from polypsam.drawing import overlay

        gt = read_mask_report(job.mask).mask if job.mask is not None else np.zeros(pred.shape, bool)
        (out / "overlays").mkdir(exist_ok=True)
        Image.fromarray(overlay(original, gt, pred, job.boxes)).save(out / "overlays" / f"{job.stem}.jpg", quality=90)
        record["overlay"] = f"overlays/{job.stem}.jpg"
    seconds["write"] = round(time.perf_counter() - t0, 4)
    seconds["total"] = round(seconds["model"] + seconds["write"], 4)
    (out / "json").mkdir(exist_ok=True)
    (out / "json" / f"{job.stem}.json").write_text(json.dumps(record, indent=1))
    return record


# -- the run -----------------------------------------------------------------------------------------------


@torch.inference_mode()
def run_prediction(net: PromptableSAM, plan: Plan, out_dir: str | Path, identity: dict | None = None,
                   batch_size: int = 8, num_workers: int = 0, device: str | torch.device = "auto",
                   precision: str = "32", threshold: float = 0.5, overlays: bool = True,
                   progress: bool = True) -> dict:
    """Predict every job of ``plan`` in batches; writes the per-image files and ``summary.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    net = net.to(dev).eval()
    identity = dict(identity or {})
    amp = _autocast(dev, precision)
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: must be at least 1.")
    ds = _JobImages(plan.jobs, net.spec.image_size, net.spec.resize_method, overlays)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_as_list)
    done, model_seconds = 0, 0.0
    t_start = time.perf_counter()
    bar = _progress(progress)
    with bar:
        task = bar.add_task("predicting", total=len(plan.jobs))
        for items in loader:
            good = [it for it in items if "error" not in it]
            for it in items:
                if "error" in it:
                    plan.skip("unreadable", f"{plan.jobs[it['index']].image} ({it['error']})")
                    bar.advance(task)
            if not good:
                continue
            t0 = time.perf_counter()
            images = torch.stack([it["image"] for it in good]).to(dev, non_blocking=True)
            input_hw = torch.tensor([it["resize"].input_hw for it in good], device=dev)
            boxes = torch.cat([it["boxes"] for it in good]).float().to(dev)
            index = torch.cat([torch.full((len(it["boxes"]),), j, dtype=torch.long) for j, it in enumerate(good)])
            with amp:
                logits, iou = net(images, input_hw, boxes, index.to(dev), encoder_grad=False)
            # logits are mapped back before the sigmoid, as SAM's postprocess_masks does
            probs = [torch.sigmoid(to_original(logits[j, 0].float(), it["resize"])).cpu().numpy()
                     for j, it in enumerate(good)]
            iou = iou.float().cpu().numpy()[:, 0]
            t_model = time.perf_counter() - t0
            model_seconds += t_model
            for j, it in enumerate(good):
                # the batch's model time is shared equally by its images
                seconds = {"model": round(t_model / len(good), 4), "batch": round(t_model, 4),
                           "batch_size": len(good)}
                _write_outputs(plan.jobs[it["index"]], out, probs[j], threshold, iou[(index == j).numpy()].tolist(),
                               seconds, it.get("original"), identity)
                done += 1
                bar.advance(task)
    wall = time.perf_counter() - t_start
    summary = {
        **identity, "predicted": done, "skipped": {k: len(v) for k, v in plan.skipped.items()},
        "skipped_files": plan.skipped, "unused_prompts": plan.unused_prompts,
        "prompt_mask_nonbinary_pixels": int(sum(j.nonbinary_pixels for j in plan.jobs)),
        "device": str(dev), "precision": str(precision), "batch_size": batch_size, "threshold": threshold,
        "seconds": round(wall, 3), "seconds_per_image": round(wall / done, 4) if done else None,
        "model_seconds_per_image": round(model_seconds / done, 4) if done else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled)


def predict(cfg: DictConfig) -> dict:
    """The whole command: plan (all checks first), load the model, predict, report."""
    for key in ("input", "output"):
        if OmegaConf.is_missing(cfg, key) or cfg.get(key) in (None, ""):
            raise ConfigError(f"{key}= is required: python -m polypsam.predict ckpt_path=<checkpoint> "
                              "input=<folder|image> prompts=<boxes.json|boxes.csv|masks folder> output=<folder>.")
    out = Path(cfg.output).expanduser()
    if Path(cfg.input).expanduser().resolve() == out.resolve():
        raise ConfigError(f"output={out} is the input folder; write predictions to another folder.")
    box = OmegaConf.to_container(cfg.box, resolve=True) if OmegaConf.is_config(cfg.get("box")) else cfg.get("box")
    plan = plan_jobs(cfg.input, cfg.get("prompts"), box, cfg.get("box_mode", "tight"),
                     int(cfg.get("min_component_area", 16)), cfg.get("limit"))
    if not plan.jobs:
        reasons = ", ".join(f"{len(v)} {k.replace('_', ' ')}" for k, v in plan.skipped.items()) or "none"
        raise DataError(f"{cfg.input}: no image to predict (skipped: {reasons}); check that prompts name the "
                        "images by file stem.")
    net, identity = load_network(cfg.get("ckpt_path"), cfg.get("model"))
    summary = run_prediction(net, plan, out, identity, batch_size=int(cfg.batch_size),
                             num_workers=int(cfg.num_workers), device=cfg.device, precision=cfg.precision,
                             threshold=float(cfg.threshold), overlays=bool(cfg.overlays),
                             progress=bool(cfg.get("progress", True)))
    for reason, files in plan.skipped.items():
        print(f"warning: skipped {len(files)} image(s), {reason.replace('_', ' ')}: {'; '.join(files[:5])}"
              f"{' ...' if len(files) > 5 else ''} (all in {out / 'summary.json'})", file=sys.stderr)
    if plan.unused_prompts:
        print(f"warning: {len(plan.unused_prompts)} prompt(s) name no input image, e.g. "
              f"{', '.join(plan.unused_prompts[:5])}", file=sys.stderr)
    if summary["predicted"]:
        print(f"predicted {summary['predicted']} image(s) in {summary['seconds']:.1f} s "
              f"({summary['seconds_per_image']:.3f} s/image, model {summary['model_seconds_per_image']:.3f} s/image)"
              f" on {summary['device']}; masks, overlays and JSON in {out}", flush=True)
    else:
        raise DataError(f"{cfg.input}: every image failed to decode ({'; '.join(plan.skipped['unreadable'][:3])}).")
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        predict(cfg)
    except PolypSamError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except torch.OutOfMemoryError as exc:
        print(f"error: out of memory on {cfg.device} ({one_line(exc)[:160]}); lower batch_size (now "
              f"{cfg.batch_size}), use precision=bf16 on a recent GPU, or device=cpu.", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
