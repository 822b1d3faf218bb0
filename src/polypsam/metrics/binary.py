"""Binary per-image Dice/IoU, and the checks every metric applies to its inputs (shapes, dtypes, ranges)."""

from __future__ import annotations

import numpy as np

EMPTY_GT_CONVENTION = (
    "Empty ground truth. dice_iou (binary Dice/IoU at a threshold): when the ground truth and the "
    "prediction are both empty the image scores Dice = IoU = 1.0 (a correct rejection); an empty ground "
    "truth with a non-empty prediction scores 0.0; a non-empty ground truth with an empty prediction "
    "scores 0.0. The toolbox meanDice/meanIoU follow the PraNet MATLAB toolbox (Fmeasure_calu.m) "
    "literally: at each threshold Dice = 2TP/(|G|+|P|) and IoU = TP/(TP+FP+FN), both 0 whenever TP = 0, "
    "so an image with an empty ground truth scores 0 at every threshold, whatever the prediction. The "
    "MONAI-compatible per-row scores (Polyp-SAM) score an empty ground truth 0.0, which is what MONAI's "
    "mean reduction returns when every row is NaN. pysodmetrics scores an empty ground truth with "
    "S = 1 - mean(pred), weighted F = 0 and E from the background alignment. No metric here returns NaN: "
    "summaries average every image."
)

# --------------------------------------------------------------------------------------------- inputs


def check_shapes(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(
            f"prediction shape {pred.shape} does not match ground-truth shape {gt.shape}; resize the "
            "prediction to the mask's original resolution (H, W) before scoring."
        )


def as_bool(mask: np.ndarray, name: str) -> np.ndarray:
    """A bool mask from bool, or integer 0/1, input; anything else is ambiguous and refused."""
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        return mask
    if np.issubdtype(mask.dtype, np.integer) and mask.size and mask.min() >= 0 and mask.max() <= 1:
        return mask.astype(bool)
    raise ValueError(
        f"{name} must be a bool mask (or integer 0/1), got dtype {mask.dtype}; threshold it first, "
        f"e.g. {name} = prob > 0.5."
    )


def gt_bool(gt: np.ndarray) -> np.ndarray:
    """Ground truth as bool: bool or 0/1 as is, uint8 0..255 as the toolbox reads it (gt > 128)."""
    gt = np.asarray(gt)
    if gt.ndim != 2:
        raise ValueError(f"ground truth must be a 2-D (H, W) mask, got shape {gt.shape}.")
    if gt.dtype == np.uint8 and gt.max(initial=0) > 1:
        return gt > 128
    return as_bool(gt, "gt")


def prob_map(prob: np.ndarray) -> np.ndarray:
    prob = np.asarray(prob)
    if prob.ndim != 2:
        raise ValueError(f"prediction must be a 2-D (H, W) probability map, got shape {prob.shape}.")
    if not np.issubdtype(prob.dtype, np.floating):
        raise ValueError(
            f"prediction must be a float probability map in [0, 1], got dtype {prob.dtype}; "
            "apply the sigmoid to the logits first."
        )
    if not np.isfinite(prob).all() or prob.min() < 0.0 or prob.max() > 1.0:
        raise ValueError(
            f"prediction must be finite and in [0, 1], got range [{np.nanmin(prob)}, {np.nanmax(prob)}]"
            " (NaN/inf present or logits passed); apply the sigmoid to the logits first."
        )
    return prob


def to_uint8_map(prob: np.ndarray) -> np.ndarray:
    """The 8-bit map the published protocol writes to PNG before the MATLAB toolbox reads it.

    Rounded (not truncated), as ``cv2.imwrite(path, prob * 255)`` in Polyp-PVT and scipy's
    ``bytescale`` in PraNet do.
    """
    return np.rint(np.clip(prob_map(prob), 0.0, 1.0) * 255.0).astype(np.uint8)


# ------------------------------------------------------------------------------------- binary Dice/IoU


def dice_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Exact per-image Dice and IoU of two binary masks (see ``EMPTY_GT_CONVENTION``)."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    check_shapes(pred, gt)
    pred, gt = as_bool(pred, "pred"), as_bool(gt, "gt")
    tp = int(np.count_nonzero(pred & gt))
    n_pred, n_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    if n_gt == 0 and n_pred == 0:
        return 1.0, 1.0
    return 2.0 * tp / (n_pred + n_gt), tp / (n_pred + n_gt - tp)
