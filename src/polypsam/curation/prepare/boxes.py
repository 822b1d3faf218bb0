"""Kvasir-SEG's published boxes: read from the archive, checked against the masks, kept as boxes.json."""

from __future__ import annotations

import json
from pathlib import PurePosixPath

import numpy as np

from polypsam.curation.prepare.sources import Tree
from polypsam.data.kvasir_boxes import parse_kvasir_boxes
from polypsam.errors import DataError

BOXES_NAME = "boxes.json"
BOX_TOLERANCE_PX = 2

Boxes = dict[str, list[list[float]]]


def read_published(tree: Tree, rel: PurePosixPath) -> tuple[Boxes, dict[str, tuple[int, int]]]:
    """The boxes in kavsir_bboxes.json and the (height, width) it states per image."""
    try:
        obj = json.loads(tree.read(rel))
    except ValueError as e:
        raise DataError(f"{tree.display(rel)}: not valid JSON ({e}); download the dataset again") from None
    return parse_kvasir_boxes(obj, tree.display(rel))


def tight_box(mask: np.ndarray) -> list[int] | None:
    """[x0, y0, x1, y1] around all foreground, None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


def _num(v: float) -> float | int:
    return int(v) if float(v).is_integer() else float(v)


def boxes_file(json_boxes: Boxes, stems) -> bytes:
    """boxes.json for the written ``stems``: one line per image, whole pixels as integers."""
    kept = {s: [[_num(v) for v in b] for b in json_boxes[s]] for s in sorted(json_boxes) if s in stems}
    return ("{\n" + ",\n".join(f"{json.dumps(s)}: {json.dumps(b)}" for s, b in kept.items()) + "\n}\n").encode()


def box_stats(json_boxes: Boxes, json_sizes: dict[str, tuple[int, int]], tight: dict[str, list[int] | None],
              sizes: dict[str, tuple[int, int]]) -> dict:
    """How far the published boxes are from the tight box around all of each mask's foreground."""
    compared, differ, multi, empty, missing, size_mismatch = 0, [], [], [], [], []
    for stem in sorted(tight):
        boxes = json_boxes.get(stem)
        if not boxes:
            missing.append(stem)
            continue
        if len(boxes) > 1:
            multi.append(stem)
        if stem in json_sizes and json_sizes[stem] != sizes[stem]:
            size_mismatch.append(stem)
        t = tight[stem]
        if t is None:
            empty.append(stem)
            continue
        union = [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                 max(b[3] for b in boxes)]
        compared += 1
        worst = max(abs(a - b) for a, b in zip(union, t))
        if worst > BOX_TOLERANCE_PX:
            differ.append({"stem": stem, "json": [_num(v) for v in union], "mask": t, "max_diff_px": _num(worst)})
    return {
        "tolerance_px": BOX_TOLERANCE_PX,
        "compared": compared,
        "differ": len(differ),
        "differ_fraction": round(len(differ) / compared, 4) if compared else None,
        "multi_box": len(multi),
        "multi_box_stems": multi,
        "empty_masks": empty,
        "missing_in_json": missing,
        "json_size_mismatch": size_mismatch,
        "differing": differ,
    }
