"""Kvasir-SEG's bounding boxes: its published ``kavsir_bboxes.json``, or the ``boxes.json`` that
``python -m polypsam.curation.prepare`` writes next to Sources/Kvasir-SEG; both read as
stem -> [[x0, y0, x1, y1], ...] in original-image pixels."""

from __future__ import annotations

import json
from pathlib import Path

from polypsam.errors import DataError


def parse_kvasir_boxes(obj, where: str) -> tuple[dict[str, list[list[float]]], dict[str, tuple[int, int]]]:
    """Boxes from a decoded boxes file, plus the (height, width) kavsir_bboxes.json gives per image.

    ``where`` names the file in errors.
    """
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object mapping image stem to boxes")
    boxes: dict[str, list[list[float]]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for stem, entry in obj.items():
        try:
            if isinstance(entry, dict):
                raw = [[b["xmin"], b["ymin"], b["xmax"], b["ymax"]] for b in entry.get("bbox", [])]
                if "height" in entry and "width" in entry:
                    sizes[stem] = (int(entry["height"]), int(entry["width"]))
            else:
                raw = list(entry)
            boxes[stem] = [[float(v) for v in b] for b in raw]
            if any(len(b) != 4 for b in boxes[stem]):
                raise ValueError("a box needs 4 numbers")
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{where}: entry {stem!r} is not a list of boxes ({e}); expected "
                            '{"<stem>": {"bbox": [{"xmin":..,"ymin":..,"xmax":..,"ymax":..}]}} or '
                            '{"<stem>": [[x0, y0, x1, y1], ...]}') from None
    return boxes, sizes


def load_kvasir_boxes(path: str | Path) -> dict[str, list[list[float]]]:
    """stem -> [[x0, y0, x1, y1], ...] in original-image pixels, from boxes.json or kavsir_bboxes.json."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; run python -m polypsam.curation.prepare on the Kvasir-SEG zip") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not readable JSON ({e}); rerun python -m polypsam.curation.prepare") from None
    return parse_kvasir_boxes(obj, str(path))[0]
