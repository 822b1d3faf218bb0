"""Per-image polyp segmentation metrics at the image's original resolution.

Three families, because the field reports three incompatible things under the name "Dice":

* ``dice_iou`` - plain per-image Dice/IoU of a binary mask (our headline number);
* ``toolbox_mean_dice_iou`` and ``sod_metrics`` - the PraNet / Polyp-PVT MATLAB toolbox
  (``eval/main.m``): meanDice/meanIoU over 256 thresholds, S-measure, weighted F, E-measure, MAE;
* ``row_dice_iou_monai_compat`` - what the Polyp-SAM notebooks actually published (per-row Dice).

``score_image`` computes all of them for one image and ``summarize`` averages over a test set with
bootstrap confidence intervals.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import stats

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

N_THRESHOLDS = 256  # the toolbox's Thresholds = 1:-1/255:0
_THRESHOLDS_ASC = np.arange(N_THRESHOLDS, dtype=np.float64) / 255.0  # k/255, correctly rounded


# --------------------------------------------------------------------------------------------- inputs


def _check_shapes(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(
            f"prediction shape {pred.shape} does not match ground-truth shape {gt.shape}; resize the "
            "prediction to the mask's original resolution (H, W) before scoring."
        )


def _as_bool(mask: np.ndarray, name: str) -> np.ndarray:
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


def _gt_bool(gt: np.ndarray) -> np.ndarray:
    """Ground truth as bool: bool or 0/1 as is, uint8 0..255 as the toolbox reads it (gt > 128)."""
    gt = np.asarray(gt)
    if gt.ndim != 2:
        raise ValueError(f"ground truth must be a 2-D (H, W) mask, got shape {gt.shape}.")
    if gt.dtype == np.uint8 and gt.max(initial=0) > 1:
        return gt > 128
    return _as_bool(gt, "gt")


def _prob_map(prob: np.ndarray) -> np.ndarray:
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
    return np.rint(np.clip(_prob_map(prob), 0.0, 1.0) * 255.0).astype(np.uint8)


# ------------------------------------------------------------------------------------- binary Dice/IoU


def dice_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Exact per-image Dice and IoU of two binary masks (see ``EMPTY_GT_CONVENTION``)."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    _check_shapes(pred, gt)
    pred, gt = _as_bool(pred, "pred"), _as_bool(gt, "gt")
    tp = int(np.count_nonzero(pred & gt))
    n_pred, n_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    if n_gt == 0 and n_pred == 0:
        return 1.0, 1.0
    return 2.0 * tp / (n_pred + n_gt), tp / (n_pred + n_gt - tp)


# ------------------------------------------------------------------------------ toolbox meanDice/meanIoU


def _threshold_levels(prob: np.ndarray) -> np.ndarray:
    """For each pixel, the largest k such that the normalised map is >= k/255 (the toolbox's test).

    uint8 maps (a saved PNG) are decided in exact integer arithmetic: with q the pixel value,
    v = (q - qmin) / (qmax - qmin) >= k/255  <=>  255 (q - qmin) >= k (qmax - qmin). Such maps put
    pixels exactly on thresholds (all of them when qmin = 0, qmax = 255), and there MATLAB decides
    in floating point (im2double, mapminmax, the colon operator's 1 - j/255), which can flip a tie by
    one ulp; pysodmetrics truncates v * 255 to uint8, which we checked drops one level for about
    1.4 % of (q, qmin, qmax) triples (never for qmin = 0, qmax = 255). Float maps are min-max
    normalised in float64 and compared with the correctly rounded thresholds k/255.
    A constant map is left as it is (MATLAB's mapminmax returns y = x when xmax = xmin).
    """
    if prob.dtype == np.uint8:
        q = prob.astype(np.int64)
        lo, hi = int(q.min()), int(q.max())
        if hi == lo:
            return q  # im2double gives q/255 and q/255 >= k/255 <=> q >= k
        return (255 * (q - lo)) // (hi - lo)
    v = prob.astype(np.float64)
    lo, hi = float(v.min()), float(v.max())
    if hi > lo:
        v = (v - lo) / (hi - lo)
    # a constant float map outside [0, 1] cannot come from the toolbox's im2double; clip like a PNG would
    v = np.clip(v, 0.0, 1.0)
    return np.searchsorted(_THRESHOLDS_ASC, v, side="right") - 1


def toolbox_dice_iou_curves(prob: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dice and IoU at the toolbox's 256 thresholds, ordered like ``Thresholds = 1:-1/255:0``.

    Useful for dataset-level maxDice (max over thresholds of the image-mean curve), which cannot be
    recovered from per-image means. One histogram plus cumulative sums replaces 256 full-image passes.
    """
    prob = np.asarray(prob)
    gt = _gt_bool(gt)
    _check_shapes(prob, gt)
    if prob.ndim != 2:
        raise ValueError(f"prediction must be a 2-D (H, W) map, got shape {prob.shape}.")
    if prob.dtype != np.uint8 and not (np.issubdtype(prob.dtype, np.floating) and np.isfinite(prob).all()):
        raise ValueError(
            f"prediction must be a uint8 map (a saved PNG) or a finite float map, got dtype {prob.dtype}."
        )
    levels = _threshold_levels(prob).ravel()
    hist_all = np.bincount(levels, minlength=N_THRESHOLDS)
    hist_gt = np.bincount(levels[gt.ravel()], minlength=N_THRESHOLDS)
    # count of pixels with level >= k, for k = 255 down to 0: the toolbox's threshold order
    n_pred = np.cumsum(hist_all[::-1])
    tp = np.cumsum(hist_gt[::-1])
    n_gt = int(np.count_nonzero(gt))
    has_tp = tp > 0
    denom = np.where(has_tp, n_gt + n_pred, 1)
    dice = np.where(has_tp, 2.0 * tp / denom, 0.0)
    iou = np.where(has_tp, tp / np.where(has_tp, n_gt + n_pred - tp, 1), 0.0)
    return dice, iou


def toolbox_mean_dice_iou(prob: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """meanDice / meanIoU of the PraNet / Polyp-PVT toolbox for one image.

    As ``eval/main.m`` and ``Fmeasure_calu.m``: gt > 128 (uint8) or bool; the map is min-max
    normalised (a constant map is kept as it is); at each threshold t in 1:-1/255:0 the prediction is
    ``map >= t`` (>=, not >, so the last threshold t = 0 marks every pixel foreground);
    Dice = 2TP/(|G|+|P|), IoU = TP/(TP+FP+FN), both 0 when TP = 0; then the mean over thresholds.
    The toolbox averages images first and thresholds second; both are means, so the mean over images
    of this value equals the toolbox's meanDic/meanIoU.

    ``prob`` is either uint8 (the 8-bit PNG the toolbox reads; ``score_image`` passes
    ``to_uint8_map(prob)``) or float (used unquantised).
    """
    dice, iou = toolbox_dice_iou_curves(prob, gt)
    return float(dice.mean()), float(iou.mean())


# ------------------------------------------------------------------------------------------ pysodmetrics


def sod_metrics(prob: np.ndarray, gt: np.ndarray, wfm_beta2: float = 1.0) -> dict[str, float]:
    """S-measure, weighted F, mean/max E-measure and MAE of one image, via pysodmetrics.

    pysodmetrics mirrors the MATLAB toolbox (``prepare_data`` is im2double + mapminmax, gt > 128),
    so it gets the 8-bit map (``to_uint8_map`` for float input) and gt as 0/255. Differences from
    the MATLAB code that we checked against both sources:

    * Weighted F: the toolbox's ``original_WFb.m`` computes ``Q = 2*R*P/(eps+R+P)`` ("Beta=1").
      pysodmetrics' ``WeightedFmeasure(beta)`` computes ``(1+beta)*R*P/(R+beta*P+eps)``, so its
      ``beta`` is beta squared of the F-beta formula; the default 1 reproduces the toolbox, and
      ``wfm_beta2`` is passed through under its real meaning.
    * Weighted F with an empty ground truth: MATLAB's ``bwdist`` of an all-zero mask gives index 0
      and ``Et(IDXT(~GT))`` fails; pysodmetrics returns 0.
    * E-measure curve: pysodmetrics bins ``(v * 255).astype(uint8)`` (truncation), which on some
      8-bit maps puts a pixel lying exactly on a threshold one level lower than MATLAB's
      ``resmap >= threshold`` (see ``_threshold_levels``); the curve is otherwise the same 256 points.
    * mean/max E-measure here are the mean and the max of this image's curve. The toolbox's maxEm is
      the max of the image-averaged curve, which is <= the mean of per-image maxima; averaging
      ``max_e_measure`` over images therefore overstates the toolbox's maxEm slightly.
    * MAE, like the toolbox's, is measured on the min-max normalised map, not on the raw probability.
    * E-measure divides by (H*W - 1), in both, so a perfect map scores H*W/(H*W - 1), slightly above 1.
    """
    import py_sod_metrics as psm  # imported here: it pulls in skimage and cv2

    gt_b = _gt_bool(gt)
    pred8 = np.asarray(prob)
    _check_shapes(pred8, gt_b)
    if pred8.dtype != np.uint8:
        pred8 = to_uint8_map(pred8)
    gt8 = gt_b.astype(np.uint8) * 255

    sm, wfm, em, mae = psm.Smeasure(alpha=0.5), psm.WeightedFmeasure(beta=wfm_beta2), psm.Emeasure(), psm.MAE()
    for metric in (sm, wfm, em, mae):
        metric.step(pred=pred8, gt=gt8)
    curve = np.asarray(em.get_results()["em"]["curve"], dtype=np.float64)
    return {
        "s_measure": float(sm.get_results()["sm"]),
        "wf_measure": float(wfm.get_results()["wfm"]),
        "mean_e_measure": float(curve.mean()),
        "max_e_measure": float(curve.max()),
        "mae": float(mae.get_results()["mae"]),
    }


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
    _check_shapes(pred, gt)
    pred, gt = _as_bool(pred, "pred"), _as_bool(gt, "gt")
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
    _check_shapes(prob, gt)
    prob = _prob_map(prob)
    gt_b = _gt_bool(gt)
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


__all__ = [
    "EMPTY_GT_CONVENTION",
    "N_THRESHOLDS",
    "bootstrap_ci",
    "dice_iou",
    "row_dice_iou_monai_compat",
    "score_image",
    "sod_metrics",
    "summarize",
    "to_uint8_map",
    "toolbox_dice_iou_curves",
    "toolbox_mean_dice_iou",
]
