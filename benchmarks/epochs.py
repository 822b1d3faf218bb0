"""Decoder-only epochs from the embedding cache against recomputing the frozen encoder (strategy=dec)."""

from __future__ import annotations

import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.utils.data import DataLoader

from benchmarks.machine import amp_dtype, sync
from benchmarks.step import run_config
from polypsam.data.batch import collate
from polypsam.data.dataset import PolypDataset, Record
from polypsam.data.embedding_cache import EmbeddingCache, file_digest
from polypsam.data.files import find_pairs
from polypsam.prompts.box import BoxPrompt
from polypsam.training.build import build_module


def epoch_bench(model: str, data_root: Path, n_images: int, batch: int, device: torch.device,
                workers: int = 0, repeats: int = 2) -> dict:
    """Epochs of strategy=dec on real images: recomputing the encoder vs reading cached embeddings.

    The real loader (PolypDataset, collate) and the real module (PolypSAMModule._embeddings fills the
    cache on the first cached epoch); random weights. After the cold epoch and one epoch that loads the
    entries into memory (``resident``), recompute, disk-cached and resident epochs alternate ``repeats``
    times; the medians are reported. Returns seconds and images/s per epoch kind.
    """
    d = data_root / "TrainDataset"
    pairs = find_pairs(d / "images", d / "masks")
    pick = sorted(np.random.default_rng(0).permutation(len(pairs))[:n_images].tolist())
    records = [Record(pairs[i].image, pairs[i].mask, pairs[i].stem, "TrainDataset", pairs[i].image.name,
                      key=file_digest(pairs[i].image)) for i in pick]
    module = build_module(run_config({"name": model}, "dec", accelerator=device.type)).to(device)
    net = module.net
    module.frozen.set_training_modes(net)  # what PolypSAMModule does before every training batch
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-6)
    dtype = amp_dtype(device)

    def epoch(cache, limit: int | None = None) -> float:
        module.embedding_cache = cache
        ds = PolypDataset(records, net.spec.image_size, BoxPrompt(), train=True, embedding_cache=cache,
                          resize_method=net.spec.resize_method)
        loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate)
        sync(device)
        t0 = time.perf_counter()
        for i, b in enumerate(loader):
            if limit is not None and i >= limit:
                break
            b = move_data_to_device(b, device)  # what Lightning does with a Batch
            with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
                loss, _ = module._step(b)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="polypsam-emb-bench-") as tmp:
        cache = EmbeddingCache.for_model(tmp, net)
        resident = EmbeddingCache.for_model(tmp, net, resident=True)
        epoch(None, limit=1)  # warm-up: one step, for first-call allocations
        cold = epoch(cache)
        written = len(cache)
        epoch(resident)  # reads each entry once into memory
        # interleaved: on shared cores the speed drifts, the ratios within a round do not
        rounds = [(epoch(None), epoch(cache), epoch(resident)) for _ in range(repeats)]
    module.resident.clear()
    out = {"recompute": statistics.median(r[0] for r in rounds), "cache_cold": cold,
           "cache_warm": statistics.median(r[1] for r in rounds),
           "resident_warm": statistics.median(r[2] for r in rounds)}
    return {"model": model, "images": len(records), "batch": batch, "workers": workers, "repeats": repeats,
            "seconds": out, "images_per_s": {k: len(records) / v for k, v in out.items()},
            "rounds_seconds": rounds, "disk_ratios": [r / w for r, w, _ in rounds],
            "resident_ratios": [r / m for r, _, m in rounds],
            "speedup_warm_vs_recompute": out["recompute"] / out["cache_warm"],
            "speedup_resident_vs_recompute": out["recompute"] / out["resident_warm"], "cache_entries": written}
