"""The PraNet / Polyp-PVT MATLAB toolbox's scores: meanDice/meanIoU over 256 thresholds, and S-measure,
weighted F, E-measure and MAE through pysodmetrics."""

from __future__ import annotations

import numpy as np

from polypsam.metrics.binary import check_shapes, gt_bool, to_uint8_map

N_THRESHOLDS = 256  # the toolbox's Thresholds = 1:-1/255:0
_THRESHOLDS_ASC = np.arange(N_THRESHOLDS, dtype=np.float64) / 255.0  # k/255, correctly rounded

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
    gt = gt_bool(gt)
    check_shapes(prob, gt)
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

    gt_b = gt_bool(gt)
    pred8 = np.asarray(prob)
    check_shapes(pred8, gt_b)
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
