"""The seeded train/validation split, written to and read back from a JSON file.

Entries are image paths relative to the data root, so a split file moves with the data and two runs
that must be compared can be pointed at the same file (``data.split_file=...``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from polypsam.errors import DataError

SPLIT_VERSION = 1


def make_split(relpaths: list[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """Shuffle the sorted list with ``seed`` and cut off ``val_fraction`` for validation."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction}: must be strictly between 0 and 1.")
    items = sorted(relpaths)
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = max(1, int(round(len(items) * val_fraction)))
    val = sorted(items[i] for i in order[:n_val])
    train = sorted(items[i] for i in order[n_val:])
    if not train:
        raise DataError(f"only {len(items)} training images: too few to split with val_fraction={val_fraction}.")
    return {"train": train, "val": val}


def write_split(path: str | Path, split: dict[str, list[str]], **meta) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"version": SPLIT_VERSION, **meta, "counts": {k: len(v) for k, v in split.items()},
           "train": split["train"], "val": split["val"]}
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")  # unique per writer, then an atomic rename
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)
    return path


def _lists(path: Path) -> dict[str, list[str]]:
    """The train and val lists of a split file, or a DataError naming the file."""
    try:
        doc = json.loads(path.read_text())
        return {"train": list(doc["train"]), "val": list(doc["val"])}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a polypsam split file ({exc}); it needs 'train' and 'val' lists.") from None


def read_split(path: str | Path, available: set[str]) -> dict[str, list[str]]:
    """Read a split file and check every entry exists among ``available`` (root-relative paths)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file not found (data.split_file); give the split.json of an earlier run.")
    split = _lists(path)
    missing = [p for p in split["train"] + split["val"] if p not in available]
    if missing:
        raise DataError(f"{path}: {len(missing)} entries are not in the data root, e.g. {missing[:5]}; "
                        "the split was made for other data (check data.root).")
    overlap = set(split["train"]) & set(split["val"])
    if overlap:
        raise DataError(f"{path}: {len(overlap)} images are in both train and val, e.g. {sorted(overlap)[:3]}.")
    return split


def split_digest(path: str | Path) -> str:
    """sha256 of a split's membership: the sorted train and val lists, nothing else.

    Two runs that trained on the same images share this digest even when their copies of the file
    differ in metadata (``source`` names where each run read it from), so the file's own sha256 would
    tell a reader the splits differ when they do not.
    """
    return membership_digest(_lists(Path(path)))


def membership_digest(split: dict[str, list[str]]) -> str:
    """``split_digest`` of train and val lists in memory (a split generated, not read from a file)."""
    lists = {k: sorted(split[k]) for k in ("train", "val")}
    return hashlib.sha256(json.dumps(lists, separators=(",", ":")).encode()).hexdigest()
