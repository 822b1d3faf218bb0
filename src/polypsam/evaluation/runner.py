"""Evaluate a network on every test set: per-image metrics at the original resolution, per-set means.

Each image is encoded once; the main prompt and every point of the robustness sweep decode from that
embedding (the encoder is the expensive part). Prompts are derived from each image's ground truth by the
configured prompt type, with the seeded draw ``seeded_rng(prompt.seed, "<set>/<image>", noise)``, so a
result does not depend on batch size or order.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader

from polypsam import __version__
from polypsam.data.dataset import Record
from polypsam.data.embedding_cache import EmbeddingCache, file_digest
from polypsam.devices import resolve_device
from polypsam.errors import DataError
from polypsam.evaluation.records import checked_test_records
from polypsam.evaluation.settings import FAILURE_SCORES, EvalSettings
from polypsam.evaluation.summaries import detection_summary, set_summaries
from polypsam.inference import AutoPredictor, ImageItems, Prediction, Predictor, as_list
from polypsam.metrics import dice_iou, score_image
from polypsam.models.registry import takes_prompts
from polypsam.models.sam import PromptableSAM
from polypsam.prompts import PromptSet, PromptType, prompt_config, seeded_rng
from polypsam.runtime import build_frozen_encoder, describe

log = logging.getLogger("polypsam.evaluate")


@dataclass
class EvalResult:
    out_dir: Path
    summary: pd.DataFrame
    per_image: pd.DataFrame
    robustness: pd.DataFrame | None
    meta: dict
    preds: dict  # (set, image) -> packed binary prediction and its shape, for figures and W&B
    # prompt=auto: per-image rows and per-set summaries of its companions (COMPANIONS), and detection counts
    companions: dict[str, pd.DataFrame] = field(default_factory=dict)
    companion_summaries: dict[str, pd.DataFrame] = field(default_factory=dict)
    detection: pd.DataFrame | None = None

    def test_metrics(self) -> dict[str, float]:
        """``test/<set>/dice`` and ``test/<set>/iou``, the keys training writes to results.json."""
        out = {}
        for r in self.summary.to_dict("records"):
            out[f"test/{r['dataset']}/dice"] = float(r["dice"])
            out[f"test/{r['dataset']}/iou"] = float(r["iou"])
        return out


def format_prompts(p: PromptSet) -> str:
    """Boxes as ``x0,y0,x1,y1;...`` (per_image.csv's ``box`` column); clicks as ``x,y,label;...``."""
    if p.boxes is not None:
        return ";".join(",".join(f"{v:.1f}" for v in b) for b in p.boxes)
    if p.points is not None:
        return ";".join(f"{x:.1f},{y:.1f},{int(lab)}" for pts, labs in zip(p.points, p.labels)
                        for (x, y), lab in zip(pts, labs))
    return ""


def _unreadable_row(set_name: str, rec: Record, item: dict, noise_levels: list[float]) -> dict:
    h, w = item["mask"].shape
    return {"dataset": set_name, "image": rec.name, "status": "unreadable", "height": h, "width": w,
            **FAILURE_SCORES, "n_prompts": 0, "box": "", "error": item["error"], "image_path": str(rec.image),
            "mask_path": str(rec.mask), "pred_mask": None,
            **{f"dice_noise_{n:g}": 0.0 for n in noise_levels}}


def _prompts(prompt: PromptType, ok: list[dict], keys: list[str], noise: float) -> list[PromptSet]:
    return [prompt.make(it["mask"], seeded_rng(prompt.seed, k, noise), noisy=True) for it, k in zip(ok, keys)]


# prompt=auto is reported beside its two stages' references, decoded from the same embeddings
COMPANIONS = {"none": "no prompt (stage 1 of auto alone)", "box": "oracle tight box (ground truth)"}


def _decode(predictor: Predictor, auto: AutoPredictor | None, emb: torch.Tensor, ok: list[dict],
            keys: list[str], prompt: PromptType) -> tuple[list[Prediction], dict[str, list[Prediction]]]:
    """The main predictions and, for ``prompt=auto``, its companions (``COMPANIONS``)."""
    resizes = [it["resize"] for it in ok]
    if auto is None:
        return predictor.decode(emb, resizes, _prompts(prompt, ok, keys, prompt.noise)), {}
    two = auto.decode(emb, resizes, auto.stage1_canvases(ok))
    oracle = predictor.decode(emb, resizes, _prompts(prompt.oracle, ok, keys, 0.0))
    return two.refined, {"none": two.proposal, "box": oracle}


def _row(set_name: str, rec: Record, it: dict, pred: Prediction, threshold: float) -> dict:
    h, w = it["mask"].shape
    return {"dataset": set_name, "image": rec.name, "status": "ok", "height": h, "width": w,
            **score_image(pred.prob, it["mask"], threshold=threshold), "n_prompts": len(pred.prompts),
            "box": format_prompts(pred.prompts), "error": "", "image_path": str(rec.image),
            "mask_path": str(rec.mask)}


def detection_row(pred: Prediction, mask: np.ndarray) -> dict:
    """Proposals of one frame against its ground truth: a proposal touches a polyp when its box holds a
    foreground pixel."""
    boxes = pred.prompts.boxes if pred.prompts.boxes is not None else np.zeros((0, 4))
    touch = [bool(mask[int(y0):int(y1) + 1, int(x0):int(x1) + 1].any()) for x0, y0, x1, y1 in boxes]
    scores = pred.prompts.scores if pred.prompts.scores is not None else []
    return {"has_polyp": bool(mask.any()), "false_proposals": touch.count(False),
            "proposal_scores": ";".join(f"{v:.3f}" for v in scores)}


def batch_embeddings(predictor: Predictor, cache: EmbeddingCache | None, ok: list[dict], recs: list[Record]
                ) -> torch.Tensor:
    """Embeddings from the cache where this encoder already made them; the rest encoded (and stored)."""
    canvases, resizes = torch.stack([it["canvas"] for it in ok]), [it["resize"] for it in ok]
    if cache is None:
        return predictor.encode(canvases, resizes)
    keys = [file_digest(recs[it["index"]].image) for it in ok]
    found = [cache.load(k) for k in keys]
    todo = [j for j, e in enumerate(found) if e is None]
    if todo:
        new = predictor.encode(canvases[todo], [resizes[j] for j in todo])
        for j, e in zip(todo, new):
            cache.save(keys[j], e)
            found[j] = e.to("cpu", torch.float16)
    return torch.stack(found).to(predictor.device, torch.float32)


def _evaluate_batch(predictor: Predictor, auto: AutoPredictor | None, ok: list[dict], recs: list[Record],
                    set_name: str, settings: EvalSettings, out: Path, preds: dict,
                    cache: EmbeddingCache | None = None) -> tuple[list[dict], dict[str, list[dict]]]:
    """Encode the batch once; decode the main prompt, its companions and every sweep point; score."""
    prompt = settings.prompt
    resizes = [it["resize"] for it in ok]
    keys = [f"{set_name}/{recs[it['index']].name}" for it in ok]
    emb = batch_embeddings(predictor, cache, ok, recs)
    main, companions = _decode(predictor, auto, emb, ok, keys, prompt)
    sweep: dict[float, list[float]] = {}
    swept = settings.sweep_prompt
    for n in settings.noise_levels:
        # a sweep point already decoded (the main prompt at its own noise, auto's oracle box) is reused
        if swept is prompt and n == prompt.noise:
            pn = main
        elif auto is not None and n == 0:
            pn = companions["box"]
        else:
            pn = predictor.decode(emb, resizes, _prompts(swept.with_noise(n), ok, keys, n))
        sweep[n] = [dice_iou(p.prob > settings.threshold, it["mask"])[0] for p, it in zip(pn, ok)]
    rows = []
    for j, (it, pred) in enumerate(zip(ok, main)):
        rec = recs[it["index"]]
        binary = pred.prob > settings.threshold
        rel_mask = None
        if settings.save_masks:
            rel_mask = f"masks/{set_name}/{rec.name}.png"
            (out / rel_mask).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(binary.astype(np.uint8) * 255).save(out / rel_mask)
        preds[(set_name, rec.name)] = (np.packbits(binary), binary.shape)
        rows.append({**_row(set_name, rec, it, pred, settings.threshold), "pred_mask": rel_mask,
                     **(detection_row(pred, it["mask"]) if auto is not None else {}),
                     **{f"dice_noise_{n:g}": sweep[n][j] for n in settings.noise_levels}})
    extra = {name: [_row(set_name, recs[it["index"]], it, p, settings.threshold) for it, p in zip(ok, ps)]
             for name, ps in companions.items()}
    return rows, extra


def label(identity: dict) -> str:
    if identity.get("strategy") in (None, "zero-shot"):
        return f"{identity['model']} zero-shot"
    return f"{identity['model']} {identity['strategy']} ({identity.get('split', '?')})"


def inference_parts(net: PromptableSAM, settings: EvalSettings, proposer: PromptableSAM | None = None
                    ) -> tuple[Predictor, AutoPredictor | None, EmbeddingCache | None]:
    """The predictor on the settings' device and encoder runtime, ``prompt=auto``'s two stages, the cache."""
    device = resolve_device(settings.device)
    encoder = build_frozen_encoder(net, settings.runtime, device) if takes_prompts(net) else None
    predictor = Predictor(net, device, encoder=encoder)
    auto = AutoPredictor(predictor, settings.prompt, proposer) if settings.prompt.from_model else None
    cache = None  # only SAM-family encoders make cacheable embeddings (keyed by the encoder's weights)
    if settings.embedding_dir and encoder is not None:
        cache = EmbeddingCache.for_model(settings.embedding_dir, net, model_key=encoder.model_key())
    return predictor, auto, cache


def run_evaluation(net: PromptableSAM, root: str | Path, out_dir: str | Path, settings: EvalSettings,
                   test_sets=None, limit_test: int | None = None, split_seed: int = 42,
                   identity: dict | None = None, generate_demo: bool = False, verbose: bool = True,
                   proposer: PromptableSAM | None = None) -> EvalResult:
    """Predict and score every test image; the tables and figures are ``evaluation.report``'s job.

    ``proposer``: stage 1 of ``prompt=auto`` when it is another network than ``net`` (``prompt.proposer``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    record_sets, unreadable_known = checked_test_records(root, test_sets, limit_test, split_seed, generate_demo)
    predictor, auto, cache = inference_parts(net, settings, proposer)

    noise_levels = settings.noise_levels
    rows: list[dict] = []
    extra: dict[str, list[dict]] = {name: [] for name in (COMPANIONS if auto is not None else ())}
    preds: dict = {}
    compute_seconds = 0.0  # model and scoring, without data loading
    for set_name, recs in record_sets.items():
        items = ImageItems([r.image for r in recs], net.spec, [r.mask for r in recs],
                           known_unreadable=unreadable_known, proposer_spec=auto.proposer_spec if auto else None)
        loader = DataLoader(items, batch_size=settings.batch_size, shuffle=False,
                            num_workers=settings.num_workers, collate_fn=as_list)
        set_t0 = time.perf_counter()
        for batch in loader:
            ok = []
            for it in batch:
                if it["status"] == "mask_error":
                    raise DataError(it["error"])
                if it["status"] == "unreadable":
                    log.warning("unreadable image, scored as a failure: %s", it["error"])
                    rows.append(_unreadable_row(set_name, recs[it["index"]], it, noise_levels))
                    for name in extra:
                        extra[name].append(_unreadable_row(set_name, recs[it["index"]], it, []))
                else:
                    ok.append(it)
            if ok:
                t0 = time.perf_counter()
                batch_rows, batch_extra = _evaluate_batch(predictor, auto, ok, recs, set_name, settings, out, preds,
                                                          cache)
                rows += batch_rows
                for name, r in batch_extra.items():
                    extra[name] += r
                compute_seconds += time.perf_counter() - t0
        if verbose:
            print(f"[evaluate] {set_name}: {len(recs)} images in {time.perf_counter() - set_t0:.1f} s",
                  flush=True)

    per_image = pd.DataFrame(rows)
    summary, robustness = set_summaries(per_image, record_sets, noise_levels, settings.bootstrap_seed)
    companions = {name: pd.DataFrame(r) for name, r in extra.items()}
    companion_summaries = {name: set_summaries(df, record_sets, [], settings.bootstrap_seed)[0]
                           for name, df in companions.items()}
    identity = {"model": net.spec.name, "strategy": "zero-shot", "split": "none", "checkpoint": None,
                **(identity or {})}
    p = settings.prompt
    meta = {**identity, "label": label(identity), "polypsam_version": __version__, "data_root": str(root),
            "prompt": {**prompt_config(p), "label": p.label(), "description": p.describe()},
            "companions": {name: COMPANIONS[name] for name in companions}, "robustness_noise": noise_levels,
            "embeddings": f"embedding cache {cache.dir} ({cache.hits} read, {cache.writes} written; fp16)" if cache
            else "encoded", "encoder_runtime": describe(predictor.encoder), "precision": predictor.precision,
            "compat_row_dice": settings.compat_row_dice, "threshold": settings.threshold,
            "limit_test": limit_test, "split_seed": split_seed, "device": str(predictor.device),
            "test_sets": {n: len(r) for n, r in record_sets.items()}, "n_images": len(per_image),
            "n_unreadable": int((per_image["status"] == "unreadable").sum()),
            "compute_seconds": round(compute_seconds, 2),
            "wall_seconds": round(time.perf_counter() - t_start, 2)}  # inference and scoring
    detection = detection_summary(per_image, record_sets) if auto is not None else None
    return EvalResult(out, summary, per_image, robustness, meta, preds, companions, companion_summaries,
                      detection)
