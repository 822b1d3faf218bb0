"""Model FLOPs (``torch.utils.flop_counter.FlopCounterMode``): per case, and per image at the real input
sizes without running the real sizes on a CPU."""

from __future__ import annotations

import gc
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.machine import cleanup, in_child
from benchmarks.step import Case, Result, Stepper
from polypsam.models import build_model

REAL_FLOPS_HEAD = ["model", "input px", "encoder fwd", "encoder fwd+bwd", "decoder step (fwd+bwd)",
                   "train img, enc_dec", "train img, dec recomputing", "eval img (fwd)"]


def count_model_flops(case: Case, device: torch.device) -> float | None:
    """Model GFLOP per image of a case's group: its stock, uncheckpointed, uncompiled path at batch 1."""
    ref = replace(case, attention="stock", ckpt=False, compile=False, batch=1)
    try:
        stepper = Stepper.for_case(ref, device)
        with FlopCounterMode(display=False) as fc:
            stepper.step()
        return fc.get_total_flops() / 1e9
    except Exception:  # noqa: BLE001 - no model-FLOP figure, the row says so
        return None
    finally:
        cleanup(device)


def fill_model_flops(results: list[Result], device: torch.device, isolate: bool = False) -> None:
    """Each result's model GFLOP per image: its group's stock row's count, else counted (``isolate``: forked)."""
    by_group: dict = {}
    for r in results:
        if r.case.is_stock and r.counted_gflop_per_img:
            by_group.setdefault(r.case.group, r.counted_gflop_per_img)
    for r in results:
        g = r.case.group
        if g not in by_group:
            if isolate:
                status, val = in_child(count_model_flops, r.case, device)
                by_group[g] = val if status == "ok" else None
            else:
                by_group[g] = count_model_flops(r.case, device)
        r.model_gflop_per_img = by_group[g]


def _encoder_flops(encoder: torch.nn.Module, size: int, device: str) -> tuple[int, int]:
    """Forward, and forward + backward, FLOPs of an image encoder at batch 1."""
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        encoder(torch.randn(1, 3, size, size, device=device))
    fwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        encoder(torch.randn(1, 3, size, size, device=device)).sum().backward()
    return fwd, fc.get_total_flops()


def real_size_flops(models: list[str]) -> list[dict]:
    """Model TFLOP per image at the real input size, without running the real size on a CPU.

    The ViT encoder is counted on the meta device (shapes only, no arithmetic); the decoder-only step
    (prompt encoder, mask decoder, Dice loss, backward) is run for real at batch 1. A training image
    costs encoder forward+backward + decoder step (enc_dec) or encoder forward + decoder step (dec
    recomputing); a validation image the forwards.
    """
    rows = []
    for name in models:
        net = build_model(name, pretrained=False, attention="stock")
        s = net.spec.image_size
        if name == "lite":  # TinyViT: small enough to count for real
            enc_fwd, enc_fb = _encoder_flops(net.image_encoder, s, "cpu")
        else:
            enc_fwd, enc_fb = _encoder_flops(net.image_encoder.to("meta"), s, "meta")
        del net
        stepper = Stepper.for_case(Case(name, strategy="dec", cache=True, attention="stock"), torch.device("cpu"))
        with FlopCounterMode(display=False) as fc:
            stepper.step()
        dec = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            stepper.module._step(stepper.batch)
        dec_fwd = fc.get_total_flops()
        del stepper
        gc.collect()
        rows.append({"model": name, "input": s, "encoder_fwd": enc_fwd / 1e12, "encoder_fwd_bwd": enc_fb / 1e12,
                     "decoder_step": dec / 1e12, "train_enc_dec": (enc_fb + dec) / 1e12,
                     "train_dec_recompute": (enc_fwd + dec) / 1e12, "eval": (enc_fwd + dec_fwd) / 1e12})
    return rows


def real_flops_rows(rows: list[dict]) -> list[list[str]]:
    keys = ("encoder_fwd", "encoder_fwd_bwd", "decoder_step", "train_enc_dec", "train_dec_recompute", "eval")
    return [[r["model"], str(r["input"])] + [f"{r[k]:.4g}" for k in keys] for r in rows]
