"""Pure drawing: a prediction over its image, for overlays, figures and prediction outputs."""

from __future__ import annotations

import cv2
import numpy as np


def overlay(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, boxes: np.ndarray | None = None,
            points: np.ndarray | None = None, labels: np.ndarray | None = None) -> np.ndarray:
    """RGB image with the ground truth outlined in green, the prediction filled in red, prompts in yellow
    (boxes; clicks as discs, filled inside the polyp and hollow outside it)."""
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
    radius = max(2, image.shape[0] // 80)
    for (x, y), lab in zip(points if points is not None else [], labels if labels is not None else []):
        cv2.circle(out, (int(round(x)), int(round(y))), radius, (255, 220, 0),
                   -1 if lab == 1 else max(1, radius // 3))
    return out
