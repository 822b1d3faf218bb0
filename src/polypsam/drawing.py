"""Pure drawing: a prediction over its image, for overlays, figures and prediction outputs."""

from __future__ import annotations

import cv2
import numpy as np


def overlay(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, boxes: np.ndarray | None = None) -> np.ndarray:
    """RGB image with the ground truth outlined in green, the prediction filled in red, boxes in yellow."""
    out = image.copy()
    red = np.zeros_like(out)
    red[..., 0] = 255
    sel = pred.astype(bool)
    out[sel] = (0.55 * out[sel] + 0.45 * red[sel]).astype(np.uint8)
    contours, _ = cv2.findContours(gt.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, (0, 255, 0), max(1, image.shape[0] // 200))
    for b in (boxes if boxes is not None else []):
        x0, y0, x1, y1 = (int(round(v)) for v in b)
        cv2.rectangle(out, (x0, y0), (x1, y1), (255, 220, 0), max(1, image.shape[0] // 250))
    return out
