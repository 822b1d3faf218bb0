"""SAM's geometry: resize the longest side, pad bottom/right, boxes in the resized frame, and back.

The resize parameters travel with every sample (``Resize``) so that a prediction at input resolution
maps back to the original image exactly (crop the pad, resize to the original size).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class Resize:
    original_hw: tuple[int, int]
    input_hw: tuple[int, int]  # size of the resized image inside the square canvas
    image_size: int  # side of the square canvas

    @property
    def scale_xy(self) -> tuple[float, float]:
        return self.input_hw[1] / self.original_hw[1], self.input_hw[0] / self.original_hw[0]


def resized_hw(h: int, w: int, image_size: int) -> tuple[int, int]:
    """SAM's ``ResizeLongestSide.get_preprocess_shape``: int(side * target / longest + 0.5)."""
    scale = image_size / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


RESIZE_METHODS = ("pil_bilinear", "cv2_area")


def resize_image(image: np.ndarray, image_size: int, method: str = "pil_bilinear") -> tuple[np.ndarray, Resize]:
    """RGB uint8 (H,W,3) -> padded uint8 (S,S,3).

    ``pil_bilinear`` is what SAM's ``ResizeLongestSide.apply_image`` does; ``cv2_area`` is LiteMedSAM's
    own ``resize_longest_side`` (cv2.INTER_AREA). Each model is fed the way it was trained.
    """
    h, w = image.shape[:2]
    nh, nw = resized_hw(h, w, image_size)
    out = np.zeros((image_size, image_size, 3), dtype=np.uint8)
    if (nh, nw) == (h, w):
        out[:h, :w] = image
    elif method == "pil_bilinear":
        out[:nh, :nw] = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    elif method == "cv2_area":
        out[:nh, :nw] = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
    else:
        raise ValueError(f"resize method {method!r}: choose one of {RESIZE_METHODS}")
    return out, Resize((h, w), (nh, nw), image_size)


def resize_mask(mask: np.ndarray, resize: Resize) -> np.ndarray:
    """bool (H,W) -> padded bool (S,S), area-averaged then thresholded at one half."""
    nh, nw = resize.input_hw
    s = resize.image_size
    out = np.zeros((s, s), dtype=bool)
    m = mask.astype(np.uint8) * 255
    interp = cv2.INTER_AREA if nh < mask.shape[0] else cv2.INTER_LINEAR
    out[:nh, :nw] = cv2.resize(m, (nw, nh), interpolation=interp) > 127
    return out


def to_original(prob: torch.Tensor, resize: Resize) -> torch.Tensor:
    """(…,S,S) map at input resolution -> (…,H,W) at the original resolution (crop, then bilinear)."""
    nh, nw = resize.input_hw
    x = prob[..., :nh, :nw]
    lead = x.shape[:-2]
    x = x.reshape(-1, 1, nh, nw).float()
    if (nh, nw) != tuple(resize.original_hw):
        x = F.interpolate(x, size=tuple(resize.original_hw), mode="bilinear", align_corners=False)
    return x.reshape(*lead, *resize.original_hw)


# -- boxes ------------------------------------------------------------------------------------------
def box_from_mask(mask: np.ndarray) -> np.ndarray | None:
    """The tight XYXY box (inclusive pixel indices, SAM's convention) around all foreground, or None."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def boxes_per_component(mask: np.ndarray, min_area: int = 16) -> np.ndarray:
    """One tight box per 8-connected component of at least ``min_area`` pixels, largest first.

    Tiny specks (annotation noise) would otherwise get a prompt of their own; if every component is
    below ``min_area`` the largest one is kept so that a non-empty mask always yields a box.
    """
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros((0, 4), dtype=np.float32)
    comps = sorted(range(1, n), key=lambda i: -stats[i, cv2.CC_STAT_AREA])
    keep = [i for i in comps if stats[i, cv2.CC_STAT_AREA] >= min_area] or comps[:1]
    out = []
    for i in keep:
        x, y, w, h = (stats[i, cv2.CC_STAT_LEFT], stats[i, cv2.CC_STAT_TOP],
                      stats[i, cv2.CC_STAT_WIDTH], stats[i, cv2.CC_STAT_HEIGHT])
        out.append([x, y, x + w - 1, y + h - 1])
    return np.asarray(out, dtype=np.float32)


def jitter_boxes(boxes: np.ndarray, hw: tuple[int, int], rng: np.random.Generator,
                 pixels: float = 0.0, fraction: float = 0.0) -> np.ndarray:
    """Move each side independently by U(-j, j), j = pixels + fraction * box side; clip to the image."""
    if boxes.size == 0 or (pixels <= 0 and fraction <= 0):
        return boxes
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    j = np.stack([pixels + fraction * w, pixels + fraction * h] * 2, axis=1)
    out = boxes + rng.uniform(-1.0, 1.0, size=boxes.shape) * j
    H, W = hw
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, W - 1)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, H - 1)
    # keep a valid box: sort corners, at least one pixel wide
    x0, x1 = np.minimum(out[:, 0], out[:, 2]), np.maximum(out[:, 0], out[:, 2])
    y0, y1 = np.minimum(out[:, 1], out[:, 3]), np.maximum(out[:, 1], out[:, 3])
    return np.stack([x0, y0, np.maximum(x1, x0 + 1), np.maximum(y1, y0 + 1)], axis=1).astype(np.float32)


def boxes_to_input(boxes: np.ndarray, resize: Resize) -> np.ndarray:
    """Original-frame XYXY -> the model's input frame (SAM's ``apply_boxes``)."""
    sx, sy = resize.scale_xy
    return (boxes * np.array([sx, sy, sx, sy], dtype=np.float32)).astype(np.float32)


def boxes_to_original(boxes: np.ndarray, resize: Resize) -> np.ndarray:
    sx, sy = resize.scale_xy
    return (boxes / np.array([sx, sy, sx, sy], dtype=np.float32)).astype(np.float32)
