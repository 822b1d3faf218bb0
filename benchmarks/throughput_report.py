"""The tables of ``benchmarks.train_throughput``: one row per case against its stock references, and the
markdown block of RESULTS.md."""

from __future__ import annotations

import sys

from benchmarks.flops import REAL_FLOPS_HEAD, real_flops_rows
from benchmarks.machine import describe
from benchmarks.step import Result
from benchmarks.tables import fmt, markdown_table


def table_rows(results: list[Result], peak_tflops: float | None) -> tuple[list[str], list[list[str]]]:
    head = ["case", "batch", "steps", "spread", "img/s", "step ms", "peak MiB", "speed x stock", "mem x stock",
            "speed x same-case stock", "mem x same-case stock", "model GFLOP/img", "counted GFLOP/img", "TFLOP/s",
            "MFU"]
    ref, own = {}, {}
    for r in results:
        if r.case.strategy == "enc_dec" and r.case.is_stock and r.images_per_s and r.case.model not in ref:
            ref[r.case.model] = r
        if r.case.is_stock and r.images_per_s:
            own.setdefault((r.case.group, r.case.batch), r)
    rows = []
    for r in results:
        if r.error:
            rows.append([r.case.label, str(r.case.batch), "-", "-", r.error] + ["-"] * (len(head) - 5))
            continue
        s = ref.get(r.case.model)
        tflops = r.model_gflop_per_img * r.images_per_s / 1e3 if r.model_gflop_per_img else None
        mfu = tflops / peak_tflops if (tflops and peak_tflops) else None
        same_batch = s is not None and s.case.batch == r.case.batch
        o = own.get((r.case.group, r.case.batch))
        rows.append([r.case.label, str(r.case.batch), str(r.steps), fmt(r.extra.get("step_spread"), ".2f"),
                     fmt(r.images_per_s, ".3g"), fmt(r.step_ms, ".4g"),
                     fmt(r.peak_mib, ".0f"),
                     fmt(r.images_per_s / s.images_per_s if s else None, ".2f"),
                     fmt(r.peak_mib / s.peak_mib if (same_batch and r.peak_mib and s.peak_mib) else None, ".2f"),
                     fmt(r.images_per_s / o.images_per_s if o else None, ".2f"),
                     fmt(r.peak_mib / o.peak_mib if (o and r.peak_mib and o.peak_mib) else None, ".2f"),
                     fmt(r.model_gflop_per_img, ".4g"), fmt(r.counted_gflop_per_img, ".4g"),
                     fmt(tflops, ".3g"), fmt(mfu, ".1%", "n/a")])
        r.extra.update(tflops=tflops, mfu=mfu)
    return head, rows


def markdown(info, steps, warmup, head, rows, probe_rows, epoch, real=None) -> str:
    cmd = "python -m benchmarks.train_throughput " + " ".join(sys.argv[1:])
    parts = [(f"Measured {info['date']} with `{cmd.strip()}` on: {describe(info)}. "
              f"{warmup} warm-up step(s) per case (the first counts FLOPs), then the timed steps in the table; "
              + ("img/s from the median step, spread = slowest / fastest step."
                 if info["kind"] == "cpu" else "img/s over all timed steps.")
              + " Columns: peak = " + ("CUDA max_memory_allocated" if info["kind"] == "cuda" else
                                       "resident-set growth (weights, gradients, AdamW state, activations)")
              + "; x stock = against the model's enc_dec stock row (segment_anything's attention and mask head); "
                "x same-case stock = against the stock row of the same strategy, cache and batch (what our "
                "attention, mask head and checkpointing change); model GFLOP = the "
                "stock, uncheckpointed path's count (MFU uses it); counted = what this path executed.")]
    if rows:
        parts.append(markdown_table(head, rows))
    if real:
        parts.append("Model TFLOP per image at the real input size, stock attention (FlopCounterMode; ViT encoders "
                     "counted on the meta device, the decoder step run at batch 1; one box per image):\n\n"
                     + markdown_table(REAL_FLOPS_HEAD, real_flops_rows(real)))
    if probe_rows:
        parts.append("Batch-size probes (one training step each, ascending until the first failure):\n\n"
                     + markdown_table(["case", "batch", "result", "img/s", "peak GiB"], probe_rows))
    if epoch:
        s, ips = epoch["seconds"], epoch["images_per_s"]
        parts.append(
            f"Decoder-only epochs, {epoch['model']} strategy dec, {epoch['images']} real training images, batch "
            f"{epoch['batch']}, loader workers {epoch['workers']}; one cold epoch (fills the cache) and one "
            f"that reads it into memory, then {epoch['repeats']} rounds of recompute / disk-cached / resident "
            "epochs (medians below):\n\n"
            + markdown_table(["epoch", "seconds", "img/s"], [[k, f"{v:.3g}", f"{ips[k]:.3g}"] for k, v in s.items()])
            + f"\n\nSpeed-up of a cached epoch over recomputing the encoder: "
              f"**{epoch['speedup_warm_vs_recompute']:.1f}x** from the disk cache (per round: "
            + ", ".join(f"{r:.1f}x" for r in epoch["disk_ratios"]) + "), "
              f"**{epoch['speedup_resident_vs_recompute']:.1f}x** with `data.embedding_cache.resident=true` "
              "(per round: " + ", ".join(f"{r:.1f}x" for r in epoch["resident_ratios"]) + ").")
    return "\n\n".join(parts)
