"""Row against row on the same images: a paired bootstrap of the mean difference and Wilcoxon's test.

Per-image Dice of two evaluations of the same test images is paired: the bootstrap resamples images (not
the two rows independently), and scipy's Wilcoxon signed-rank test ranks the per-image differences.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import wilcoxon

KEY = ["dataset", "image"]


def paired_comparison(a: pd.DataFrame, b: pd.DataFrame, metric: str = "dice", n_boot: int = 10000,
                      seed: int = 0) -> pd.DataFrame:
    """Per test set: images, mean of ``a`` and ``b``, mean difference a - b with its 95% paired-bootstrap
    interval, and the two-sided Wilcoxon signed-rank p (None when every difference is zero).

    ``a`` and ``b`` are per_image.csv tables; only images present in both are compared (their count is
    reported), so a row evaluated on a subset is never compared against the whole set.
    """
    both = a[KEY + [metric]].rename(columns={metric: "a"}).merge(b[KEY + [metric]].rename(columns={metric: "b"}),
                                                                  on=KEY)
    rng = np.random.default_rng(seed)
    rows = []
    for name, sub in both.groupby("dataset", sort=False):
        d = (sub["a"] - sub["b"]).to_numpy(float)
        boots = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(axis=1)
        p = float(wilcoxon(d).pvalue) if np.any(d != 0) else None
        rows.append({"dataset": name, "n_images": len(d), "mean_a": float(sub["a"].mean()),
                     "mean_b": float(sub["b"].mean()), "diff": float(d.mean()),
                     "ci_low": float(np.percentile(boots, 2.5)), "ci_high": float(np.percentile(boots, 97.5)),
                     "wilcoxon_p": p})
    return pd.DataFrame(rows)


def seed_spread(summaries: dict[str, pd.DataFrame], metric: str = "dice") -> pd.DataFrame:
    """Per test set, over runs that differ only in seed: mean, sample standard deviation, min and max."""
    long = pd.concat([s.assign(run=name) for name, s in summaries.items()])
    out = []
    for name, sub in long.groupby("dataset", sort=False):
        v = sub[metric].to_numpy(float)
        out.append({"dataset": name, "seeds": len(v), "mean": float(v.mean()),
                    "sd": float(v.std(ddof=1)) if len(v) > 1 else None, "min": float(v.min()),
                    "max": float(v.max())})
    return pd.DataFrame(out)


def subset_means(per_image: pd.DataFrame, subset: dict[str, set[str]], metric: str = "dice") -> pd.DataFrame:
    """Per test set: the mean of ``metric`` over the images ``subset[set]`` names and over the others.

    ``subset`` maps a set (per_image.csv's ``dataset``) to image names, e.g. the masks whose tight box
    a speck stretches (``python -m polypsam.curation.specks``); a mean over no image is NaN.
    """
    rows = []
    for name, sub in per_image.groupby("dataset", sort=False):
        inside = sub["image"].astype(str).isin(subset.get(name, set()))
        rows.append({"dataset": name, "n_in": int(inside.sum()), "n_out": int((~inside).sum()),
                     "mean_in": float(sub.loc[inside, metric].mean()),
                     "mean_out": float(sub.loc[~inside, metric].mean())})
    return pd.DataFrame(rows)


def seed_mean(per_images: list[pd.DataFrame], metric: str = "dice") -> pd.DataFrame:
    """Per image, the mean of ``metric`` over runs that differ only in seed (the images all of them hold):
    one row per image, so a seeded row is compared with another row by its mean, not by one lucky seed."""
    long = pd.concat([p[KEY + [metric]] for p in per_images])
    counts = long.groupby(KEY, sort=False)[metric].transform("size")
    return long[counts == len(per_images)].groupby(KEY, sort=False, as_index=False)[metric].mean()
