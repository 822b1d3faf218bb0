"""Masks whose literal tight box a stray speck stretches: counted and named.

    python -m polypsam.curation.specks ROOT [--min-area 16] [--out specks.json]

The paper's box prompt is the tight box around every foreground pixel (``BoxPrompt(min_area=0)``). A
single stray pixel far from the polyp stretches that box over most of the frame: PraNet's copy of
Kvasir-SEG carries one at (0,0) in 131 of its 900 training masks. A mask is *stretched* when the area of
its literal tight box exceeds the area of the tight box with components under ``min_area`` pixels
ignored (``BoxPrompt(min_area=...)``) by more than ``GROWTH`` (10 %). Both boxes come from
:class:`polypsam.prompts.box.BoxPrompt`, the prompt the models are given.

``SPECK_MIN_AREA`` = 16 px, the default of :func:`polypsam.geometry.boxes_per_component`.
Measured on the development data (``../shared/data/polyp``, 1,205 training and 100 test masks): every
stretching component is 1 to 3 px, and polyps (and the parts a polyp is split into) are hundreds of
pixels, so any ``min_area`` from 4 to 100 gives the same count; 16 sits well inside that plateau.

The same report is written by ``prepare`` (``prepare_report.json``, per set) and by training
(``data_report.json``, per part of the split). This command only reads ROOT.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from polypsam.cli import run_cli
from polypsam.data.files import find_pairs, find_test_sets
from polypsam.data.io import read_mask
from polypsam.devices import usable_cpus
from polypsam.errors import DataError
from polypsam.prompts.box import BoxPrompt

SPECK_MIN_AREA = 16  # px; components smaller than this are specks
GROWTH = 0.10  # a mask is stretched when its literal tight box is more than 10 % larger in area


def _area(box: np.ndarray) -> float:
    """Area of an inclusive-index XYXY box in pixels."""
    return float((box[2] - box[0] + 1) * (box[3] - box[1] + 1))


def box_growth(mask: np.ndarray, min_area: int = SPECK_MIN_AREA) -> float | None:
    """Area of the literal tight box over that of the box without specks, minus 1; None for an empty mask."""
    literal = BoxPrompt(min_area=0).boxes(mask)
    if len(literal) == 0:
        return None
    clean = BoxPrompt(min_area=min_area).boxes(mask)
    return _area(literal[0]) / _area(clean[0]) - 1.0


def speck_report(masks: Sequence[Path], root: Path, min_area: int = SPECK_MIN_AREA,
                 threads: int | None = None) -> dict:
    """How many of ``masks`` are stretched by a speck, and which (paths relative to ``root``, with growth)."""
    root = Path(root)
    with ThreadPoolExecutor(max_workers=threads or usable_cpus()) as pool:  # decoding and OpenCV release the GIL
        growth = list(pool.map(lambda p: box_growth(read_mask(p), min_area), masks))
    stretched = {Path(p).relative_to(root).as_posix(): round(g, 3)
                 for p, g in zip(masks, growth) if g is not None and g > GROWTH}
    return {"rule": f"literal tight box more than {GROWTH:.0%} larger in area than with components under "
                    f"{min_area} px ignored",
            "min_area": min_area, "growth_above": GROWTH, "masks": len(masks),
            "empty": sum(g is None for g in growth), "stretched": len(stretched),
            "stretched_masks": dict(sorted(stretched.items(), key=lambda kv: (-kv[1], kv[0])))}


def data_sets(root: Path) -> dict[str, Path]:
    """The PraNet-layout sets under ``root``: ``TrainDataset`` and every ``TestDataset/<name>``."""
    sets = {"TrainDataset": root / "TrainDataset"} if (root / "TrainDataset").is_dir() else {}
    sets.update({f"TestDataset/{n}": p for n, p in find_test_sets(root).items()})
    return sets


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m polypsam.curation.specks", description=__doc__.split("\n\n")[2])
    ap.add_argument("root", help="data root in PraNet's layout (only read)")
    ap.add_argument("--min-area", type=int, default=SPECK_MIN_AREA, help="specks: components under this many px")
    ap.add_argument("--out", help="write the report as JSON to this file")
    args = ap.parse_args(argv)
    return run_cli(_run, args, return_code=True)


def _run(args: argparse.Namespace) -> int:
    root = Path(args.root).expanduser()
    sets = data_sets(root)
    if not sets:
        raise DataError(f"{root}: no TrainDataset or TestDataset/<name> folder; give a data root in PraNet's "
                        "layout (python -m polypsam.curation.prepare builds one).")
    report = {"root": str(root.resolve()), "sets": {}}
    for name, folder in sets.items():
        masks = [p.mask for p in find_pairs(folder / "images", folder / "masks")]
        rep = speck_report(masks, root, args.min_area)
        report["sets"][name] = rep
        print(f"{name}: {rep['stretched']} of {rep['masks']} masks stretched by a speck", flush=True)
    print(f"rule: {rep['rule']}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
