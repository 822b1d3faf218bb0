"""Metrics checked against hand computations and slow, independent reference loops."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from polypsam.metrics import (
    EMPTY_GT_CONVENTION,
    bootstrap_ci,
    dice_iou,
    row_dice_iou_monai_compat,
    score_image,
    sod_metrics,
    summarize,
    to_uint8_map,
    toolbox_dice_iou_curves,
    toolbox_mean_dice_iou,
)


def _square(shape, top, left, size):
    m = np.zeros(shape, bool)
    m[top:top + size, left:left + size] = True
    return m


def _ellipse(shape, cy, cx, ry, rx):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


# ------------------------------------------------------------------------------------------- dice_iou


def test_dice_iou_hand_cases():
    gt = _square((10, 10), 2, 2, 4)
    assert dice_iou(gt, gt) == (1.0, 1.0)
    empty = np.zeros((10, 10), bool)
    assert dice_iou(empty, empty) == (1.0, 1.0)  # correct rejection
    assert dice_iou(gt, empty) == (0.0, 0.0)  # empty GT, non-empty prediction
    assert dice_iou(empty, gt) == (0.0, 0.0)  # missed polyp
    assert dice_iou(_square((10, 10), 6, 6, 4), gt) == (0.0, 0.0)  # disjoint
    # two 4x4 squares overlapping by half (2 columns): TP 8, |P| = |G| = 16, union 24
    d, i = dice_iou(_square((10, 10), 2, 4, 4), gt)
    assert d == pytest.approx(0.5) and i == pytest.approx(1 / 3)


def test_dice_iou_refuses_probabilities_and_mismatched_shapes():
    gt = _square((10, 10), 2, 2, 4)
    with pytest.raises(ValueError, match="threshold it first"):
        dice_iou(gt * 0.7, gt)
    with pytest.raises(ValueError, match=r"\(10, 12\).*\(10, 10\)"):
        dice_iou(np.zeros((10, 12), bool), gt)


def test_empty_gt_convention_is_documented():
    text = EMPTY_GT_CONVENTION.lower()
    assert "1.0" in text and "0 whenever tp = 0" in text and "fmeasure_calu" in text


# ------------------------------------------------------------------------------------ toolbox meanDice


def _reference_curves(v: np.ndarray, gt: np.ndarray):
    """Fmeasure_calu.m, one full-image pass per threshold, on an already normalised map."""
    dice, iou = [], []
    n_gt = gt.sum()
    for k in range(255, -1, -1):
        label = v >= k / 255  # the toolbox's test
        tp = np.sum(label & gt)
        n_rec = label.sum()
        if tp == 0:
            dice.append(0.0)
            iou.append(0.0)
        else:
            dice.append(2 * tp / (n_gt + n_rec))
            iou.append(tp / (n_gt - tp + n_rec))
    return np.array(dice), np.array(iou)


def test_toolbox_tiny_map_by_hand():
    # levels: 1.0 -> thresholds k <= 255, 0.5 -> k <= 127, 0 -> only k = 0
    prob = np.array([[1.0, 0.5], [0.0, 0.0]])
    gt = np.array([[True, True], [False, False]])
    # k = 255..128: P = {1.0}: Dice 2/3, IoU 1/2 (128 thresholds)
    # k = 127..1:   P = {1.0, 0.5} = G: Dice 1, IoU 1 (127 thresholds)
    # k = 0:        P = everything: Dice 4/6, IoU 2/4
    md, mi = toolbox_mean_dice_iou(prob, gt)
    assert md == pytest.approx(213 / 256, abs=1e-12)
    assert mi == pytest.approx(191.5 / 256, abs=1e-12)


def test_toolbox_matches_reference_loop_on_float_map():
    rng = np.random.default_rng(3)
    gt = _ellipse((40, 50), 20, 24, 12, 15)
    prob = np.clip(0.6 * gt + 0.5 * rng.random(gt.shape) - 0.05, 0.0, 1.0)
    v = (prob - prob.min()) / (prob.max() - prob.min())
    ref_d, ref_i = _reference_curves(v, gt)
    d, i = toolbox_dice_iou_curves(prob, gt)
    np.testing.assert_allclose(d, ref_d, atol=1e-12)
    np.testing.assert_allclose(i, ref_i, atol=1e-12)
    md, mi = toolbox_mean_dice_iou(prob, gt)
    assert md == pytest.approx(ref_d.mean(), abs=1e-12) and mi == pytest.approx(ref_i.mean(), abs=1e-12)
    assert 0.0 < md < 1.0


def test_toolbox_uint8_map_decides_ties_exactly():
    # 8-bit maps put pixels exactly on thresholds; the reference decides them in exact fractions
    rng = np.random.default_rng(5)
    q = rng.integers(20, 201, size=(6, 7)).astype(np.uint8)  # qmin/qmax not 0/255: many ties
    gt8 = np.where(rng.random((6, 7)) < 0.4, 255, 0).astype(np.uint8)  # toolbox reads gt > 128
    gt = gt8 > 128
    lo, hi = int(q.min()), int(q.max())
    ref = []
    for k in range(255, -1, -1):
        label = np.array([[Fraction(int(x) - lo, hi - lo) >= Fraction(k, 255) for x in row] for row in q])
        tp = int(np.sum(label & gt))
        ref.append(0.0 if tp == 0 else 2 * tp / (gt.sum() + label.sum()))
    d, _ = toolbox_dice_iou_curves(q, gt8)
    np.testing.assert_allclose(d, ref, atol=1e-12)


def test_toolbox_uses_greater_equal_and_its_binary_map_gap():
    # a binary map equal to the GT: thresholds 1..1/255 give Dice 1 (>= keeps the 1.0 pixels at t = 1),
    # t = 0 makes every pixel foreground (>= 0): Dice 2G/(G+N). With ">" it would be 255/256 instead.
    gt = _ellipse((64, 80), 30, 40, 10, 14)
    g, n = gt.sum(), gt.size
    md, _ = toolbox_mean_dice_iou(gt.astype(np.float64), gt)
    assert md == pytest.approx((255 + 2 * g / (g + n)) / 256, abs=1e-12)
    assert md != pytest.approx(255 / 256, abs=1e-6)


def test_toolbox_constant_and_empty_gt():
    gt = _square((20, 20), 5, 5, 6)
    g, n = gt.sum(), gt.size
    # constant map: kept as is (mapminmax returns x); 0 is foreground only at t = 0
    md, _ = toolbox_mean_dice_iou(np.zeros((20, 20)), gt)
    assert md == pytest.approx(2 * g / (g + n) / 256, abs=1e-12)
    md1, _ = toolbox_mean_dice_iou(np.full((20, 20), 255, np.uint8), gt)
    assert md1 == pytest.approx(2 * g / (g + n), abs=1e-12)
    # empty GT: TP = 0 at every threshold, so 0 whatever the prediction
    assert toolbox_mean_dice_iou(np.zeros((20, 20)), np.zeros((20, 20), bool)) == (0.0, 0.0)


def test_toolbox_field_notes_gap_on_a_real_mask(real_root):
    from polypsam.data.io import read_mask

    mask_path = min((real_root / "TestDataset" / "Kvasir" / "masks").iterdir())
    gt = read_mask(mask_path)
    pred = np.roll(gt, 5, axis=1)
    d, _ = dice_iou(pred, gt)
    md, _ = toolbox_mean_dice_iou(pred.astype(np.float64), gt)
    g, n = gt.sum(), gt.size
    assert md == pytest.approx((255 * d + 2 * g / (g + n)) / 256, abs=1e-12)
    assert 0.001 < d - md < 0.005  # FIELD_NOTES: "about 0.003 below binary Dice"


def test_toolbox_is_fast_on_full_hd():
    import time

    rng = np.random.default_rng(0)
    gt = _ellipse((1072, 1920), 500, 900, 300, 400)
    prob = np.clip(0.8 * np.roll(gt, 5, axis=1) + 0.2 * rng.random(gt.shape), 0.0, 1.0)
    t0 = time.perf_counter()
    toolbox_mean_dice_iou(prob, gt)
    toolbox_mean_dice_iou(to_uint8_map(prob), gt)
    assert time.perf_counter() - t0 < 2.0  # a 256-pass loop takes ~10 s here


# -------------------------------------------------------------------------------------------- sod


def test_sod_metrics_perfect_prediction():
    gt = _ellipse((60, 70), 30, 35, 15, 20)
    r = sod_metrics(gt.astype(np.float64), gt)
    assert r["s_measure"] == pytest.approx(1.0, abs=1e-6)
    assert r["wf_measure"] == pytest.approx(1.0, abs=1e-6)
    assert r["mae"] == 0.0
    assert r["max_e_measure"] == pytest.approx(1.0, abs=1e-3)  # N/(N-1) in the toolbox's formula
    assert r["mean_e_measure"] < r["max_e_measure"]  # the t = 0 threshold marks everything foreground


def test_sod_mae_by_hand_and_on_the_normalised_map():
    gt = np.zeros((8, 8), bool)
    gt[:4] = True
    prob = np.zeros((8, 8))
    prob[:4, :4] = 1.0
    prob[:4, 4:] = 0.2  # 51/255 exactly
    prob[4:, :4] = 0.6  # 153/255
    # |v - gt|: 0 on 16 px, 0.8 on 16 px, 0.6 on 16 px, 0 on 16 px
    assert sod_metrics(prob, gt)["mae"] == pytest.approx((16 * 0.8 + 16 * 0.6) / 64, abs=1e-12)
    # the toolbox min-max normalises first: a map in [0.2, 0.6] is stretched to [0, 1]
    squeezed = np.where(gt, 0.6, 0.2)
    assert sod_metrics(squeezed, gt)["mae"] == pytest.approx(0.0, abs=1e-12)


def test_sod_weighted_f_beta_is_passed_through():
    gt = _ellipse((60, 70), 30, 35, 15, 20)
    pred = np.roll(gt, 6, axis=1).astype(np.float64)
    f1 = sod_metrics(pred, gt)["wf_measure"]
    f03 = sod_metrics(pred, gt, wfm_beta2=0.3)["wf_measure"]
    assert 0.0 < f1 < 1.0 and f03 != pytest.approx(f1, abs=1e-4)


# -------------------------------------------------------------------------------- Polyp-SAM row compat


def test_row_compat_by_hand():
    gt = np.zeros((4, 5), bool)
    gt[1, 1:4] = True
    gt[2, 1:4] = True
    pred = np.zeros((4, 5), bool)
    pred[0, 0] = True  # false positive in a row without polyp: not penalised
    pred[1, 1:4] = True  # row 1: Dice 1, IoU 1
    pred[2, 2:5] = True  # row 2: TP 2, |P| 3, |G| 3 -> Dice 2/3, IoU 2/4
    rd, ri = row_dice_iou_monai_compat(pred, gt)
    assert rd == pytest.approx((1 + 2 / 3) / 2) and ri == pytest.approx((1 + 0.5) / 2)
    # per image: TP 5, |P| 7, |G| 6
    d, i = dice_iou(pred, gt)
    assert d == pytest.approx(10 / 13) and i == pytest.approx(5 / 8)
    # a GT row the prediction misses scores 0 and counts
    pred[1] = False
    assert row_dice_iou_monai_compat(pred, gt)[0] == pytest.approx((0 + 2 / 3) / 2)
    # no GT at all: MONAI's mean of all-NaN rows is 0
    assert row_dice_iou_monai_compat(pred, np.zeros_like(gt)) == (0.0, 0.0)


def test_row_compat_lower_than_per_image_on_a_shifted_ellipse():
    gt = _ellipse((120, 160), 60, 80, 30, 45)
    pred = np.roll(gt, 5, axis=1)  # FIELD_NOTES: 5-pixel shift, 0.934 per image vs 0.882 per row
    d, i = dice_iou(pred, gt)
    rd, ri = row_dice_iou_monai_compat(pred, gt)
    assert rd < d - 0.02 and ri < i - 0.02
    # false positives in rows without polyp change the per-image score only
    extra = gt.copy()
    extra[:10, :20] = True
    assert row_dice_iou_monai_compat(extra, gt) == (1.0, 1.0)
    assert dice_iou(extra, gt)[0] < 1.0


# ------------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_ci_properties():
    rng = np.random.default_rng(0)
    small = rng.beta(8, 2, size=30)
    lo, hi = bootstrap_ci(small, seed=1)
    assert lo < small.mean() < hi
    big = rng.beta(8, 2, size=3000)
    blo, bhi = bootstrap_ci(big, seed=1)
    assert blo < big.mean() < bhi
    assert (bhi - blo) < (hi - lo) / 4  # ~ 1/sqrt(100) narrower
    assert bootstrap_ci(small, seed=7) == bootstrap_ci(small, seed=7)
    assert bootstrap_ci(small, seed=7) != bootstrap_ci(small, seed=8)
    assert bootstrap_ci([0.42]) == (0.42, 0.42)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([0.5, float("nan")])
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])


# ---------------------------------------------------------------------------------- score / summarize


KEYS = {"dice", "iou", "mean_dice", "mean_iou", "s_measure", "wf_measure", "mean_e_measure",
        "max_e_measure", "mae", "row_dice", "row_iou"}


def test_score_image_keys_values_and_errors():
    gt = _ellipse((48, 64), 24, 32, 12, 18)
    prob = np.clip(np.roll(gt, 3, axis=1) * 0.9 + 0.05, 0.0, 1.0)
    r = score_image(prob, gt)
    assert set(r) == KEYS
    assert all(isinstance(v, float) and np.isfinite(v) for v in r.values())
    assert (r["dice"], r["iou"]) == dice_iou(prob > 0.5, gt)
    assert r["mean_dice"] == toolbox_mean_dice_iou(to_uint8_map(prob), gt)[0]
    assert r["row_dice"] < r["dice"]
    # the threshold is strict (prob > threshold)
    assert score_image(np.where(gt, 0.5, 0.0), gt)["dice"] == 0.0
    with pytest.raises(ValueError, match=r"\(48, 60\).*\(48, 64\)"):
        score_image(prob[:, :60], gt)
    with pytest.raises(ValueError, match="sigmoid"):
        score_image(prob * 4 - 2, gt)  # logits


def test_summarize_rows():
    rng = np.random.default_rng(2)
    gt = _ellipse((40, 50), 20, 25, 10, 14)
    rows = [score_image(np.clip(np.roll(gt, s, axis=1) + 0.1 * rng.random(gt.shape), 0, 1), gt) for s in (0, 2, 4, 6)]
    out = summarize(rows, seed=0)
    for key in KEYS:
        assert out[key] == pytest.approx(np.mean([r[key] for r in rows]))
    assert out["n_images"] == 4.0
    assert out["dice_ci_low"] <= out["dice"] <= out["dice_ci_high"]
    assert out["iou_ci_low"] <= out["iou"] <= out["iou_ci_high"]
    assert out["dice_ci_low"] < out["dice_ci_high"]
    assert summarize(rows, seed=0) == out
    only = summarize(rows, keys=["mae"])
    assert set(only) == {"mae", "n_images"}
    with pytest.raises(ValueError, match="'dice' is NaN"):
        summarize(rows + [{**rows[0], "dice": float("nan")}])
    with pytest.raises(ValueError, match="no rows"):
        summarize([])
