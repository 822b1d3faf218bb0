"""Per-set tables of an evaluation's per-image rows: means with bootstrap intervals, the robustness sweep,
and what ``prompt=auto`` proposed."""

from __future__ import annotations

import pandas as pd

from polypsam.evaluation.settings import METRICS
from polypsam.metrics import summarize


def detection_summary(per_image: pd.DataFrame, set_names) -> pd.DataFrame:
    """Per set, what ``prompt=auto`` proposed: misses, proposals touching no polyp, correct rejections."""
    out = []
    for set_name in set_names:
        sub = per_image[(per_image["dataset"] == set_name) & (per_image["status"] == "ok")]
        pos, n = sub["has_polyp"].astype(bool), sub["n_prompts"]
        out.append({"dataset": set_name, "frames": len(sub), "with_polyp": int(pos.sum()),
                    "proposals": int(n.sum()), "missed": int((pos & (n == 0)).sum()),
                    "false_proposals": int(sub["false_proposals"].sum()),
                    "correct_rejections": int((~pos & (n == 0)).sum()),
                    "false_alarms": int((~pos & (n > 0)).sum())})
    return pd.DataFrame(out)


def set_summaries(per_image: pd.DataFrame, set_names, noise_levels: list[float], seed: int
               ) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    summary_rows, robust_rows = [], []
    for set_name in set_names:
        sub = per_image[per_image["dataset"] == set_name]
        stats = summarize(sub[list(METRICS)].to_dict("records"), keys=METRICS, seed=seed)
        bad = sub[sub["status"] == "unreadable"]["image"].tolist()
        summary_rows.append({"dataset": set_name, "n_images": int(stats.pop("n_images")),
                             "n_unreadable": len(bad), **stats, "unreadable": ";".join(bad)})
        for n in noise_levels:
            col = sub[f"dice_noise_{n:g}"].to_numpy(float)
            r = summarize([{"dice": v} for v in col], keys=["dice"], seed=seed)
            robust_rows.append({"dataset": set_name, "noise": n, "dice": r["dice"],
                                "dice_ci_low": r["dice_ci_low"], "dice_ci_high": r["dice_ci_high"],
                                "n_images": int(r["n_images"])})
    return pd.DataFrame(summary_rows), (pd.DataFrame(robust_rows) if robust_rows else None)
