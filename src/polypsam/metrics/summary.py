"""Every metric for one image (:func:`score_image`) and their means over a test set with bootstrap intervals."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import stats

from polypsam.metrics.binary import check_shapes, dice_iou, gt_bool, prob_map, to_uint8_map
from polypsam.metrics.compat import row_dice_iou_monai_compat
from polypsam.metrics.toolbox import sod_metrics, toolbox_mean_dice_iou

# -------------------------------------------------------------------------------------------- summaries


def _bootstrap_rng_kwarg() -> str:
    # scipy >= 1.15 takes ``rng``; older releases (the project allows scipy >= 1.10) ``random_state``
    return "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"


def bootstrap_ci(
    values: Iterable[float], n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean over images.

    NaN is refused: the empty-mask convention has to be decided before averaging, not by dropping.
    """
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-D sequence of per-image values.")
    if not np.isfinite(arr).all():
        raise ValueError(
            f"bootstrap_ci got {int((~np.isfinite(arr)).sum())} NaN/inf value(s); decide the convention "
            "for those images (see EMPTY_GT_CONVENTION) before summarising."
        )
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    if arr.size == 1 or np.all(arr == arr[0]):
        v = float(arr[0])
        return v, v
    res = stats.bootstrap(
        (arr,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
        vectorized=True, **{_bootstrap_rng_kwarg(): np.random.default_rng(seed)},
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def score_image(prob: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Every metric for one image; ``prob`` is a float map in [0, 1] with the mask's shape.

    Binary scores use ``prob > threshold``; the toolbox scores (meanDice, S, wF, E, MAE) use the
    8-bit map the published protocol saves as PNG (``to_uint8_map``).
    """
    prob = np.asarray(prob)
    gt = np.asarray(gt)
    check_shapes(prob, gt)
    prob = prob_map(prob)
    gt_b = gt_bool(gt)
    binary = prob > threshold
    pred8 = to_uint8_map(prob)

    dice, iou = dice_iou(binary, gt_b)
    mean_dice, mean_iou = toolbox_mean_dice_iou(pred8, gt_b)
    row_dice, row_iou = row_dice_iou_monai_compat(binary, gt_b)
    return {
        "dice": dice,
        "iou": iou,
        "mean_dice": mean_dice,
        "mean_iou": mean_iou,
        **sod_metrics(pred8, gt_b),
        "row_dice": row_dice,
        "row_iou": row_iou,
    }


def summarize(
    rows: Sequence[dict[str, float]], keys: Sequence[str] | None = None, seed: int = 0
) -> dict[str, float]:
    """Mean of each metric over images, 95 % bootstrap intervals for Dice and IoU, and the count."""
    rows = list(rows)
    if not rows:
        raise ValueError("summarize got no rows: no image was scored.")
    keys = list(rows[0].keys()) if keys is None else list(keys)
    out: dict[str, float] = {}
    columns: dict[str, np.ndarray] = {}
    for key in keys:
        missing = [i for i, row in enumerate(rows) if key not in row]
        if missing:
            raise ValueError(f"metric {key!r} is missing from {len(missing)} row(s), first at index {missing[0]}.")
        col = np.array([float(row[key]) for row in rows], dtype=np.float64)
        if not np.isfinite(col).all():
            bad = int(np.flatnonzero(~np.isfinite(col))[0])
            raise ValueError(f"metric {key!r} is NaN/inf at row {bad}; decide its convention before summarising.")
        columns[key] = col
        out[key] = float(col.mean())
    for key in ("dice", "iou"):
        if key in columns:
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = bootstrap_ci(columns[key], seed=seed)
    out["n_images"] = float(len(rows))
    return out
