"""Polyp-SAM's published per-row Dice/IoU (MONAI on (1, H, W) tensors), reproduced without MONAI."""

from __future__ import annotations

import numpy as np

from polypsam.metrics.binary import as_bool, check_shapes

# ------------------------------------------------------------------------------- Polyp-SAM compatibility


def row_dice_iou_monai_compat(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """The Dice/IoU that the Polyp-SAM notebooks published, reproduced without MONAI.

    They call MONAI ``DiceMetric()`` / ``MeanIoU()`` (include_background=True, ignore_empty=True,
    reduction "mean") on (1, H, W) tensors, which MONAI reads as batch 1, H channels, width W. So:

    * every image row is a "channel" scored on its own: Dice_r = 2|P_r & G_r| / (|P_r| + |G_r|),
      IoU_r = |P_r & G_r| / |P_r | G_r|;
    * rows without ground truth are NaN (ignore_empty) and dropped by the mean, so false positives
      in rows without polyp cost nothing, and a row whose polyp the prediction misses scores 0;
    * the image score is the plain mean over the rows that contain polyp (short rows at the top and
      bottom of a polyp weigh as much as the widest row);
    * an image without any ground truth scores 0.0 (MONAI's mean of all-NaN returns 0).

    Written by hand because MONAI is not a dependency and the behaviour is three numpy lines.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    check_shapes(pred, gt)
    pred, gt = as_bool(pred, "pred"), as_bool(gt, "gt")
    if gt.ndim != 2:
        raise ValueError(f"masks must be 2-D (H, W), got shape {gt.shape}.")
    inter = np.count_nonzero(pred & gt, axis=1)
    n_gt = np.count_nonzero(gt, axis=1)
    n_pred = np.count_nonzero(pred, axis=1)
    rows = n_gt > 0
    if not rows.any():
        return 0.0, 0.0
    inter, n_gt, n_pred = inter[rows], n_gt[rows], n_pred[rows]
    dice = 2.0 * inter / (n_gt + n_pred)
    iou = inter / (n_gt + n_pred - inter)
    return float(dice.mean()), float(iou.mean())
