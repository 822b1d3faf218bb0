"""On-disk cache of images already decoded and resized to a model's input size.

A Kvasir JPEG is up to 1920x1080: decoding it and resizing it to SAM's 1024 canvas costs more than
everything else the loader does, and without augmentation the result is the same every epoch. This
cache stores the resized region (``input_hw``, uint8 RGB, the zero pad is not stored) as a ``.npy``
file, which loads with a memory copy and no decoding.

Keys: the folder is named by the canvas size, the resize method and a digest of the code version
(``CACHE_VERSION``), the file by the sha256 of the image bytes (the same key as the embedding cache). A changed image, size
or resize code therefore lands on another path and can never be served stale. Writes go to a temporary
file that is renamed, so data-loader workers and concurrent jobs filling the same entry race harmlessly.

With augmentation the image must be augmented at full resolution before it is resized, so
``PolypDataset`` bypasses this cache for augmented sets (and logs that it does).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from polypsam.data.io import atomic_write
from polypsam.geometry import RESIZE_METHODS

# Bump when read_image or resize_image change the pixels they produce: old entries then go unused.
CACHE_VERSION = "read_image-rgb-uint8;resize_image-longest-side-pad-bottom-right;v1"


class ImageCache:
    def __init__(self, root: str | Path, image_size: int, resize_method: str = "pil_bilinear",
                 version: str = CACHE_VERSION):
        if resize_method not in RESIZE_METHODS:
            raise ValueError(f"resize method {resize_method!r}: choose one of {RESIZE_METHODS}")
        self.image_size = int(image_size)
        self.resize_method = resize_method
        tag = hashlib.sha256(version.encode()).hexdigest()[:8]
        self.dir = Path(root).expanduser() / f"{self.image_size}px-{resize_method}-{tag}"
        self.dir.mkdir(parents=True, exist_ok=True)
        note = self.dir / "VERSION.txt"
        if not note.exists():  # for a person looking at the folder; never read back
            atomic_write(note, lambda f: f.write(f"{version}\n".encode()))
        self.hits = 0
        self.writes = 0

    def path(self, image_key: str) -> Path:
        return self.dir / image_key[:2] / f"{image_key}.npy"

    def load(self, image_key: str, input_hw: tuple[int, int]) -> np.ndarray | None:
        """The resized (h, w, 3) uint8 region, or None on a miss (absent, unreadable or of another shape)."""
        p = self.path(image_key)
        if not p.exists():
            return None
        try:
            region = np.load(p, allow_pickle=False)
        except (OSError, ValueError, EOFError):  # a bad disk; a torn file cannot happen (rename)
            return None
        if region.dtype != np.uint8 or region.shape != (*tuple(input_hw), 3):
            return None  # e.g. the image's mask has another size: let the uncached path raise its error
        self.hits += 1
        return region

    def save(self, image_key: str, region: np.ndarray) -> None:
        if region.dtype != np.uint8 or region.ndim != 3 or region.shape[2] != 3:
            raise ValueError(f"ImageCache.save: expected a (h, w, 3) uint8 region, got {region.dtype} "
                             f"{tuple(region.shape)}")
        p = self.path(image_key)
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(p, lambda f: np.save(f, np.ascontiguousarray(region), allow_pickle=False))
        self.writes += 1

    def __len__(self) -> int:
        return sum(1 for _ in self.dir.glob("*/*.npy"))

    def __repr__(self) -> str:
        return f"ImageCache({self.dir})"

