"""What to predict: input images and their prompts, all checked before any model is loaded."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from polypsam.cli import one_line
from polypsam.data.io import IMAGE_EXTENSIONS, image_size, read_mask_report, size_mismatch
from polypsam.data.kvasir_boxes import load_kvasir_boxes
from polypsam.errors import ConfigError, DataError
from polypsam.prompts import PromptSet, PromptType, seeded_rng
from polypsam.prompts.box import BoxPrompt


@dataclass
class Job:
    """One image and the prompts it is decoded with (original-image pixels)."""

    image: Path
    prompts: PromptSet
    source: str  # where the prompts came from
    hw: tuple[int, int] = (0, 0)
    mask: Path | None = None  # prompt mask (outlined in the overlay)
    nonbinary_pixels: int = 0  # prompt-mask pixels thresholding had to decide

    @property
    def stem(self) -> str:
        return self.image.stem

    @property
    def boxes(self) -> np.ndarray | None:
        return self.prompts.boxes


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


def plan_jobs(input: str | Path, prompts: str | Path | None = None, box=None, prompt: PromptType | None = None,
              limit: int | None = None) -> Plan:
    """Every image with its prompts, checked against the image size before any model is loaded.

    Prompts come from ``box`` (one image), a boxes file (.json, .csv), or a folder of masks, from which
    ``prompt`` (a prompt type, box by default) derives them as evaluation does. ``prompt=none`` and
    ``prompt=auto`` need none of these: every image is predicted, in name order (video frames too).
    """
    prompt = prompt or BoxPrompt()
    images = list_images(input)
    if limit is not None:
        images = images[:max(0, int(limit))]  # the first images by name: a quick look at a big folder
    single = Path(input).expanduser().is_file()
    plan = Plan([])
    if not prompt.needs_mask:
        if prompts is not None or box is not None:
            raise ConfigError(f"prompt={prompt.name} needs no prompts: drop prompts=/box=, or use prompt=box to "
                              "predict from your boxes.")
        sizes = _header_sizes(images, plan, single)
        plan.jobs = [Job(img, PromptSet(empty=True), prompt.label(), sizes[img]) for img in images if img in sizes]
        return plan
    if prompts is not None and box is not None:
        raise ConfigError("give either prompts=<boxes.json|boxes.csv|masks folder> or box=[x0,y0,x1,y1], not both.")
    if prompts is None and box is None:
        raise ConfigError("SAM needs a prompt per image: give prompts=<boxes.json|boxes.csv|masks folder>, or "
                          "box=[x0,y0,x1,y1] for a single image; or prompt=auto with a checkpoint trained "
                          "with prompt=mixed to predict with no prompt at all.")
    sizes = _header_sizes(images, plan, single)
    if box is not None:
        if not single:
            raise ConfigError(f"box= is for a single image, but input={input} is a folder; give "
                              "prompts=<boxes.json|boxes.csv> with a box per image.")
        boxes = box if box and isinstance(box[0], (list, tuple)) else [box]
        img = images[0]
        checked = np.stack([check_box(b, sizes[img], img, "box=") for b in boxes])
        plan.jobs.append(Job(img, PromptSet(boxes=checked), "box=", sizes[img]))
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
                raise size_mismatch(m, rep.mask.shape, img, sizes[img], "a prompt mask is drawn on its image")
            made = prompt.make(rep.mask, seeded_rng(prompt.seed, img.stem), noisy=True)
            if len(made) == 0:
                plan.skip("empty_prompt_mask", str(m))
                continue
            plan.jobs.append(Job(img, made, f"mask {m.name} ({prompt.describe()})", sizes[img], m,
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
        checked = np.stack([check_box(b, sizes[img], img, src.name) for b in rows])
        plan.jobs.append(Job(img, PromptSet(boxes=checked), src.name, sizes[img]))
    if limit is None:
        plan.unused_prompts = sorted(set(table) - {p.stem for p in images})
    return plan
