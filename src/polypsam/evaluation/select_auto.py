"""Choose ``prompt=auto``'s settings on a checkpoint's validation split (``python -m polypsam.select_auto``).

The validation images are encoded once (the evaluation's encoder runtime and embedding cache), stage 1
decodes once per image, and every grid point refines from that batch (``AutoBatch`` decodes each box set
once). A setting's score is the mean per-image Dice (``metrics.dice_iou``; a frame without a polyp scores
1 with an empty mask). Ties go to the default settings, then to the earlier grid point. Test images are
never read; the settings file goes beside the checkpoint (or to ``out=``), never into the data root.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from polypsam.data.datamodule import folder_records
from polypsam.data.dataset import Record
from polypsam.data.splits import make_split, membership_digest, read_split
from polypsam.errors import ConfigError, DataError
from polypsam.evaluation.runner import batch_embeddings, detection_row, inference_parts
from polypsam.evaluation.settings import settings_from_cfg
from polypsam.evaluation.summaries import detection_summary
from polypsam.inference import ImageItems, as_list
from polypsam.metrics import dice_iou
from polypsam.prompts import auto_settings
from polypsam.prompts.auto import AutoPrompt
from polypsam.runtime import RuntimeSettings
from polypsam.training.checkpoints import load_model

log = logging.getLogger("polypsam.select_auto")


@dataclass(frozen=True)
class Grid:
    """The values swept (conf/select_auto.yaml's ``grid``); keep=clear is tried with each clear_margin."""

    threshold: tuple[float, ...]
    min_score: tuple[float, ...]
    min_area: tuple[float, ...]
    margin: tuple[float, ...]
    score: tuple[str, ...]
    keep: tuple[str, ...]
    clear_margin: tuple[float, ...]
    final_score: tuple[float, ...]
    rebox: tuple[int, ...]
    blend: tuple[float, ...]

    @classmethod
    def from_cfg(cls, grid) -> Grid:
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if not grid.get(n)]
        if missing:
            raise ConfigError(f"conf/select_auto.yaml: grid.{missing[0]} needs at least one value (grid keys: "
                              f"{', '.join(names)}).")
        return cls(**{n: tuple(grid[n]) for n in names})

    def points(self, default: AutoPrompt) -> list[AutoPrompt]:
        """The default first, then every combination not equal to one before it."""
        keeps = [("all", default.clear_margin)] * ("all" in self.keep) + \
            [("clear", m) for m in self.clear_margin] * ("clear" in self.keep)
        blends = self.blend if default.proposer else (default.blend,)  # a blend needs a separate proposer
        out = {default: None}
        for thr, ms, ma, mg, sc, (kp, cm), fs, rb, bl in itertools.product(
                self.threshold, self.min_score, self.min_area, self.margin, self.score, keeps, self.final_score,
                self.rebox, blends):
            out.setdefault(dataclasses.replace(default, threshold=thr, min_score=ms, min_area=ma, margin=mg, score=sc,
                                               keep=kp, clear_margin=cm, final_score=fs, rebox=rb, blend=bl))
        return list(out)


def validation_split(cfg, meta: dict, ckpt: Path) -> tuple[list[Record], dict]:
    """The validation records of the checkpoint's run: ``data.split_file``, else the run's split.json, else
    the split its config generates (its seed and fraction)."""
    data = (meta.get("config") or {}).get("data") or {}
    root = Path(cfg.data.root).expanduser()
    train_dirs = list(data.get("train_dirs") or cfg.data.train_dirs)
    run_split = ckpt.resolve().parent.parent / "split.json"
    path = cfg.data.get("split_file") or (run_split if run_split.is_file() else data.get("split_file"))
    by_rel = {r.relpath: r for d in train_dirs for r in folder_records(root, d)}
    if path:
        split = read_split(path, set(by_rel))
    else:
        split = make_split(list(by_rel), float(data.get("val_fraction", 0.2)), int(data.get("split_seed", 42)))
    return [by_rel[p] for p in split["val"]], {
        "file": str(path) if path else None, "digest": membership_digest(split), "train_dirs": train_dirs,
        "data_root": str(root), "val_images": len(split["val"])}


def sweep(auto, predictor, cache, recs: list[Record], points: list[AutoPrompt], threshold: float,
          batch_size: int, num_workers: int) -> dict[str, np.ndarray]:
    """Per grid point and image: Dice, proposals kept and proposals touching no polyp; and stage 1's Dice."""
    items = ImageItems([r.image for r in recs], predictor.spec, [r.mask for r in recs],
                       proposer_spec=auto.proposer_spec)
    loader = DataLoader(items, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=as_list)
    cols: dict[str, list] = {"dice": [], "n_prompts": [], "false_proposals": [], "none": [], "has_polyp": []}
    for batch in loader:
        ok = []
        for it in batch:
            if it["status"] == "mask_error":
                raise DataError(it["error"])
            if it["status"] == "unreadable":  # a validation frame that cannot be read tunes nothing
                log.warning("unreadable validation image, left out of the selection: %s", it["error"])
            else:
                ok.append(it)
        if not ok:
            continue
        stages = auto.stage1(batch_embeddings(predictor, cache, ok, recs), [it["resize"] for it in ok],
                             auto.stage1_canvases(ok), tuple({p.blend for p in points}))
        cols["none"] += [dice_iou(p.prob > threshold, it["mask"])[0] for p, it in zip(stages.maps(points[0]), ok)]
        cols["has_polyp"] += [bool(it["mask"].any()) for it in ok]
        scored: dict[tuple[int, bytes], tuple[float, int, int]] = {}  # (image, kept boxes) -> its scores
        per_point = []
        for prompt in points:
            row = []
            for j, (it, pred) in enumerate(zip(ok, stages.refine(prompt))):
                key = (j, pred.prompts.boxes.tobytes())
                if key not in scored:
                    scored[key] = (dice_iou(pred.prob > threshold, it["mask"])[0], len(pred.prompts),
                                   detection_row(pred, it["mask"])["false_proposals"])
                row.append(scored[key])
            per_point.append(row)
        block = np.asarray(per_point, np.float64).reshape(len(points), len(ok), 3)
        cols["dice"].append(block[..., 0])
        cols["n_prompts"].append(block[..., 1].astype(int))
        cols["false_proposals"].append(block[..., 2].astype(int))
    if not cols["none"]:
        raise DataError(f"no readable validation image among {len(recs)}: nothing to choose settings on.")
    return {k: (np.concatenate(v, axis=1) if k in ("dice", "n_prompts", "false_proposals") else np.asarray(v))
            for k, v in cols.items()}


def _detection(res: dict[str, np.ndarray], g: int) -> dict:
    rows = pd.DataFrame({"dataset": "val", "status": "ok", "has_polyp": res["has_polyp"],
                         "n_prompts": res["n_prompts"][g], "false_proposals": res["false_proposals"][g]})
    return {k: int(v) for k, v in detection_summary(rows, ["val"]).iloc[0].items() if k != "dataset"}


def select_auto(cfg) -> dict:
    """The Hydra task: sweep the grid on the checkpoint's validation split, write the settings file."""
    t0 = time.perf_counter()
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise ConfigError("ckpt_path= is required: python -m polypsam.select_auto ckpt_path=<run>/checkpoints/"
                          "best.ckpt (a checkpoint trained with prompt=mixed or prompt=none).")
    ckpt = Path(cfg.ckpt_path).expanduser()
    proposer_path = cfg.prompt.get("proposer")
    out = Path(cfg.out).expanduser() if cfg.get("out") else auto_settings.beside(ckpt, proposer_path)
    root = Path(cfg.data.root).expanduser().resolve()
    if out.resolve().is_relative_to(root):
        raise ConfigError(f"out={out} lies in the data root {root}; write the settings beside the checkpoint "
                          "(leave out= unset) or elsewhere.")
    net, meta = load_model(ckpt)
    settings = settings_from_cfg(cfg)
    if not isinstance(settings.prompt, AutoPrompt):
        raise ConfigError(f"prompt={settings.prompt.name}: python -m polypsam.select_auto tunes prompt=auto only; "
                          "leave the prompt group at auto.")
    settings.prompt = default = dataclasses.replace(settings.prompt, settings=None)
    settings.runtime = RuntimeSettings.from_cfg(cfg, meta.get("config"))
    recs, split = validation_split(cfg, meta, ckpt)
    proposer = load_model(default.proposer)[0] if default.proposer else None
    predictor, auto, cache = inference_parts(net, settings, proposer)
    points = Grid.from_cfg(cfg.grid).points(default)
    log.info("prompt=auto selection: %d settings on %d validation images of %s", len(points), len(recs), ckpt)
    res = sweep(auto, predictor, cache, recs, points, settings.threshold, settings.batch_size, settings.num_workers)
    means = res["dice"].mean(axis=1)
    best = int(np.argmax(means))  # the first maximum: the default (point 0) wins a tie
    top = np.argsort(-means, kind="stable")[:5]
    doc = {"identity": auto_settings.identity(ckpt, net.spec, default.proposer),
           "chosen": auto_settings.tuned(points[best]), "default": auto_settings.tuned(default),
           "validation_dice": {"chosen": float(means[best]), "default": float(means[0]),
                               "none": float(res["none"].mean())},
           "detection": {"chosen": _detection(res, best), "default": _detection(res, 0)},
           "grid": {"size": len(points), "axes": dataclasses.asdict(Grid.from_cfg(cfg.grid))},
           "top": [{"dice": float(means[g]), **auto_settings.tuned(points[g])} for g in top],
           "split": {**split, "images_scored": int(res["dice"].shape[1])}, "threshold": settings.threshold,
           "embeddings": f"embedding cache {cache.dir} ({cache.hits} read, {cache.writes} written)" if cache
           else "encoded", "seconds": round(time.perf_counter() - t0, 1)}
    auto_settings.write(out, doc)
    print(f"[select_auto] {len(points)} settings on {doc['split']['images_scored']} validation images: Dice "
          f"{means[best]:.4f} chosen, {means[0]:.4f} default, {doc['validation_dice']['none']:.4f} prompt=none; "
          f"wrote {out}", flush=True)
    return {**doc, "path": str(out)}
