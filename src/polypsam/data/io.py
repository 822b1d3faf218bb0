"""Reading images and masks with explicit conversions and errors that name the file.

Pillow is used rather than ``cv2.imread`` because it raises on truncated or non-image files
instead of returning ``None`` or a half-decoded array, and it reads RGB (not BGR, the trap in
the Polyp-SAM notebooks).

Masks: a pixel above ``MASK_THRESHOLD`` (127 of 255) is polyp, and 0/1 masks are read as such. A mask whose
largest value is 2..127 (0/100, 16-bit 0/1000) has its polyp on another scale, not absent: an error, never an
empty mask. A set whose masks are all empty is refused by :func:`require_foreground`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from polypsam.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
MASK_THRESHOLD = 127  # mask pixels > 127 are polyp; PraNet's toolbox uses gt > 128 on 0/255 masks
MASK_FIX = ("masks must be 0/255 or 0/1 binary: rescale them so that polyp pixels are 255 and background 0 "
            "(e.g. mask = (mask > 0) * 255)")

M = TypeVar("M")  # a set's mask as require_foreground's caller names it (a path, an archive member)


def _open(path: Path) -> Image.Image:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file does not exist.")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes); re-copy or remove it.")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc}); the file is truncated or not an image, "
                        "re-copy or remove it.") from None
    return img


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """16-bit and float images are rescaled by their type's range, not clipped."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        top = 65535 if arr.max(initial=0) > 255 else 255
        return np.round(arr.astype(np.float64) * (255.0 / top)).astype(np.uint8)
    return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """An RGB uint8 array (H, W, 3). Grayscale is replicated, alpha dropped, 16-bit rescaled."""
    img = _open(Path(path))
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = _to_uint8(np.asarray(img))
        return np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr[..., :3]
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img))


@dataclass(frozen=True)
class MaskRead:
    mask: np.ndarray  # bool (H, W)
    nonbinary_pixels: int  # pixels whose value was neither 0 nor the maximum (JPEG artefacts, resampling)


def read_mask_report(path: str | Path) -> MaskRead:
    """A binary mask and how many pixels thresholding had to decide."""
    img = _open(Path(path))
    arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2) if arr.shape[2] >= 3 else arr[..., 0]
    arr = _to_uint8(arr)
    top = int(arr.max(initial=0))
    if top == 1:  # 0/1 masks are common in other toolkits
        return MaskRead(arr.astype(bool), 0)
    if 1 < top <= MASK_THRESHOLD:  # 0/100, 16-bit 0/1000: a foreground that thresholding would erase
        raise DataError(f"{path}: mask values are 0 to {top} (of 255), none above the polyp threshold "
                        f"{MASK_THRESHOLD}, so its polyp would read as empty; {MASK_FIX}.")
    nonbinary = int(np.count_nonzero((arr != 0) & (arr != 255)))
    return MaskRead(arr > MASK_THRESHOLD, nonbinary)


def read_mask(path: str | Path) -> np.ndarray:
    """A bool mask (H, W): value > 127 is polyp (0/1 masks are accepted as such); a mask whose largest value
    is 2..127 is a :class:`DataError` (its foreground is on another scale, not absent)."""
    return read_mask_report(path).mask


def require_foreground(name: str, masks: Sequence[M], read: Callable[[M], MaskRead] = read_mask_report,
                       shown: Callable[[M], str] = str) -> None:
    """Refuse a set in which every mask reads as empty: its scores would be the empty-ground-truth convention
    (Dice 1 for an empty prediction), not a measurement, and it has nothing to train on.

    Masks are read in order until one has a polyp pixel, so a usable set costs one decode. A mask whose values
    are all 2..127 fails in ``read`` (:func:`read_mask_report`). Both errors name the set.
    """
    for m in masks:
        try:
            if read(m).mask.any():
                return
        except DataError as exc:
            raise DataError(f"{name}: {exc}") from None
    if masks:
        raise DataError(f"{name}: all {len(masks)} masks are empty (no pixel above {MASK_THRESHOLD}, e.g. "
                        f"{shown(masks[0])}), so there is no polyp to score or train on; masks mark polyp pixels "
                        "255 (or 1) on 0: check that masks/ holds this set's ground truth, or remove the set.")


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file does not exist.")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes); re-copy or remove it.")
    try:
        with Image.open(path) as img:
            w, h = img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image ({exc}); re-copy or remove it.") from None
    return h, w


def decoded_size(path: str | Path) -> tuple[int, int]:
    """(height, width) after decoding every pixel: unlike :func:`image_size`, a truncated file fails here."""
    img = _open(Path(path))
    try:
        w, h = img.size
    finally:
        img.close()
    return h, w


def size_mismatch(mask, mask_hw, image, image_hw, fix: str = "re-export the mask at the image's size or "
                  "remove the pair") -> DataError:
    """The one error for a mask whose (h, w) differs from its image's: both files, both sizes, the fix."""
    return DataError(f"{mask}: mask is {mask_hw[1]}x{mask_hw[0]} but its image {image} is {image_hw[1]}x"
                     f"{image_hw[0]}; masks must have their image's size: {fix}.")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a unique temporary file beside ``path`` and rename it into place.

    Readers never see a torn file, and concurrent writers of the same content (DDP ranks, sweep jobs
    filling a cache) race harmlessly: the last rename wins.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
