"""Writing one recognised set into ROOT: images as published or as lossless PNG, masks as 0/255 PNG.

A file whose bytes would not change is not rewritten (its mtime stays); ``force`` rewrites everything.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from polypsam.curation.prepare.boxes import BOXES_NAME, box_stats, boxes_file, read_published, tight_box
from polypsam.curation.prepare.detect import Found
from polypsam.curation.prepare.sources import Tree
from polypsam.data.io import read_image, read_mask_report, require_foreground, size_mismatch
from polypsam.download import sha256_file
from polypsam.errors import DataError


@dataclass
class Counts:
    written: int = 0
    removed: int = 0
    unchanged: int = 0


@dataclass
class SetResult:
    out_rel: str
    kind: str
    origin: str
    thresholded: int = 0
    warnings: list[str] = field(default_factory=list)
    boxes: dict | None = None
    digests: dict[str, str] = field(default_factory=dict)  # relative path -> sha256 of what is on disk


def put(dest: Path, data: bytes, force: bool, counts: Counts) -> str:
    """Write ``data`` unless ``dest`` already holds exactly these bytes; return their sha256."""
    digest = hashlib.sha256(data).hexdigest()
    if not force and dest.is_file() and dest.stat().st_size == len(data) and sha256_file(dest) == digest:
        counts.unchanged += 1
        return digest
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    except OSError as e:
        raise DataError(f"{dest}: cannot write ({e.strerror}); free disk space or choose another --out") from None
    counts.written += 1
    return digest


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _decode(fn, tree: Tree, rel: PurePosixPath, path: Path):
    """polypsam.data.io's readers, with the temporary path replaced by the archive member's name."""
    try:
        return fn(path)
    except DataError as e:
        msg = str(e).replace(str(path), tree.display(rel))
        if tree.in_archive:
            msg += " (inside the archive: download it again)"
        raise DataError(msg) from None


def _remove_stale(found: Found, out: Path, wanted: dict[str, set[str]], force: bool, counts: Counts,
                  res: SetResult) -> None:
    """Files this run did not produce: another format of the same stem would break pairing, so it goes;
    anything else is only removed with ``force`` (it may be the user's own addition)."""
    for sub in ("images", "masks"):
        folder = out / sub
        if not folder.is_dir():
            continue
        stems = {Path(n).stem for n in wanted[sub]}
        stale = []
        for p in sorted(folder.iterdir()):
            if p.name.startswith(".") or not p.is_file() or p.name in wanted[sub]:
                continue
            if p.stem in stems or force:
                p.unlink()
                counts.removed += 1
            else:
                stale.append(p.name)
        if stale:
            res.warnings.append(f"{found.out_rel}/{sub}: {len(stale)} file(s) not in {found.origin} left in place ("
                                + ", ".join(stale[:5]) + (" ..." if len(stale) > 5 else "")
                                + "); remove them or rerun with --force")


def check_masks(found: Found) -> None:
    """Before any file is written: a set whose masks are all empty, or whose first masks have their polyp
    below the threshold (values 2..127), stops prepare (``require_foreground``: about one decode per set)."""
    tree = found.tree
    require_foreground(found.out_rel, [m for _, m in found.pairs], shown=tree.display,
                       read=lambda rel: _decode(read_mask_report, tree, rel, tree.local(rel, "mask")[1]))


def write_set(found: Found, root: Path, force: bool, counts: Counts, progress) -> SetResult:
    """Write ``found`` to ROOT/<out_rel>, advancing a rich ``progress`` task per pair."""
    tree = found.tree
    out = root / found.out_rel
    res = SetResult(found.out_rel, found.kind, found.origin, warnings=list(found.notes))
    if found.unpaired:
        res.warnings.append(f"{found.out_rel}: skipped {len(found.unpaired)} unpaired file(s) in {found.origin}: "
                            + ", ".join(found.unpaired[:10]) + (" ..." if len(found.unpaired) > 10 else ""))
    json_boxes = None
    json_sizes: dict[str, tuple[int, int]] = {}
    if found.boxes_json is not None:
        json_boxes, json_sizes = read_published(tree, found.boxes_json)
    tight: dict[str, list[int] | None] = {}
    sizes: dict[str, tuple[int, int]] = {}
    wanted: dict[str, set[str]] = {"images": set(), "masks": set()}
    task = progress.add_task(found.out_rel, total=len(found.pairs))
    for img_rel, mask_rel in found.pairs:
        stem = img_rel.stem
        data, path = tree.local(img_rel, "image")
        rgb = _decode(read_image, tree, img_rel, path)
        with Image.open(path) as im:
            fmt = im.format
        if fmt == "JPEG":
            name, payload = stem + ".jpg", data
        elif fmt == "PNG":
            name, payload = stem + ".png", data
        else:
            name, payload = stem + ".png", _png(rgb)
        _, mpath = tree.local(mask_rel, "mask")
        mr = _decode(read_mask_report, tree, mask_rel, mpath)
        if mr.mask.shape != rgb.shape[:2]:
            raise size_mismatch(tree.display(mask_rel), mr.mask.shape, tree.display(img_rel), rgb.shape[:2],
                                "fix or remove the pair")
        res.thresholded += mr.nonbinary_pixels
        res.digests[f"{found.out_rel}/images/{name}"] = put(out / "images" / name, payload, force, counts)
        res.digests[f"{found.out_rel}/masks/{stem}.png"] = put(
            out / "masks" / f"{stem}.png", _png(mr.mask.astype(np.uint8) * 255), force, counts)
        wanted["images"].add(name)
        wanted["masks"].add(stem + ".png")
        if json_boxes is not None:
            tight[stem] = tight_box(mr.mask)
            sizes[stem] = rgb.shape[:2]
        progress.advance(task)
    _remove_stale(found, out, wanted, force, counts, res)
    if json_boxes is not None:
        res.boxes = box_stats(json_boxes, json_sizes, tight, sizes)
        res.digests[f"{found.out_rel}/{BOXES_NAME}"] = put(out / BOXES_NAME, boxes_file(json_boxes, tight), force,
                                                           counts)
    return res
