"""The study layer: paired comparisons on the same images, the seed spread, the figures and the report."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon

from polypsam.study import paired_comparison, seed_spread
from polypsam.study.figures import robustness_all, validation_curves
from polypsam.study.report import paired_markdown


def _per_image(dice, sets=("Kvasir",), start=0):
    return pd.DataFrame([{"dataset": s, "image": f"i{i}", "dice": d} for s in sets
                         for i, d in enumerate(dice, start=start)])


def test_paired_comparison_pairs_images_not_rows():
    rng = np.random.default_rng(0)
    b = rng.uniform(0.5, 0.9, 40)
    a = b + 0.02 + rng.normal(0, 0.005, 40)  # better on every image by a little
    t = paired_comparison(_per_image(a), _per_image(b)).iloc[0]
    assert t["n_images"] == 40 and t["diff"] == pytest.approx(np.mean(a - b))
    assert 0 < t["ci_low"] < t["diff"] < t["ci_high"] < 0.03  # paired: tight although rows spread widely
    assert t["wilcoxon_p"] == pytest.approx(wilcoxon(a - b).pvalue) and t["wilcoxon_p"] < 1e-6
    # only the images both rows hold are compared
    part = paired_comparison(_per_image(a[:10]), _per_image(b)).iloc[0]
    assert part["n_images"] == 10 and part["mean_b"] == pytest.approx(b[:10].mean())
    same = paired_comparison(_per_image(b), _per_image(b)).iloc[0]
    assert same["diff"] == 0 and same["wilcoxon_p"] is None


def test_seed_spread_and_the_noise_verdict():
    sums = {f"s{k}": pd.DataFrame({"dataset": ["Kvasir"], "dice": [v]}) for k, v in enumerate([0.90, 0.92, 0.91])}
    s = seed_spread(sums).iloc[0]
    assert s["seeds"] == 3 and s["sd"] == pytest.approx(0.01) and (s["min"], s["max"]) == (0.90, 0.92)
    small = pd.DataFrame([{"dataset": "Kvasir", "n_images": 5, "mean_a": 0.915, "mean_b": 0.90, "diff": 0.015,
                           "ci_low": 0.01, "ci_high": 0.02, "wilcoxon_p": 0.01}])
    big = small.assign(diff=0.05, ci_low=0.04, ci_high=0.06)
    md = paired_markdown([("q1", "a", "b", small), ("q2", "a", "b", big)], seed_spread(sums))
    assert "noise (smaller than the seed spread)" in md.splitlines()[2] and "a higher" in md.splitlines()[3]


def test_figures_draw_every_row(tmp_path):
    m = tmp_path / "metrics.csv"
    pd.DataFrame({"epoch": [0, 0, 1], "step": [0, 60, 120], "val/dice": [0.9, 0.92, 0.93]}).to_csv(m, index=False)
    fig = validation_curves({"dec": m})
    line = fig.axes[0].lines[0]
    assert list(line.get_xdata()) == [0, 1, 2] and list(line.get_ydata()) == [0.9, 0.92, 0.93]
    rob = pd.DataFrame({"dataset": ["Kvasir"] * 2, "noise": [0.0, 0.1], "dice": [0.9, 0.8]})
    fig = robustness_all({"dec": rob}, {"auto": pd.DataFrame({"dataset": ["Kvasir"], "dice": [0.85]})})
    assert len(fig.axes[0].lines) == 2 and fig.axes[0].lines[1].get_ydata()[0] == 0.85
