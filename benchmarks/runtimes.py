"""The frozen encoder's CPU runtimes side by side, in one process, on the real polyp images.

    PYTHONPATH=src python -m benchmarks.runtimes            # about 20 minutes on 2 cores
    PYTHONPATH=src python -m benchmarks.runtimes --smoke    # a few images per section

For LiteMedSAM (``model=lite``), each runtime and precision (torch fp32, ONNX Runtime fp32, OpenVINO fp32
and bf16) in turn, on the same images, threads from the cores available:

- ``encoder``: ms per image of ``FrozenEncoder.encode`` (normalisation included; best of two rounds), the
  speed-up over torch, and the largest relative error of an embedding against torch's;
- ``cache fill``: per training image, decode + resize + encode + write an embedding-cache entry;
- ``evaluate``: ``run_evaluation`` (box prompts, no sweep, nothing written) on ``--limit`` images of each
  dev test set: seconds per image end to end and Dice; then OpenVINO fp32 and bf16 on the whole dev test
  sets: the Dice change of bf16 per set;
- ``predict auto``: ``run_prediction`` with ``prompt=auto`` (both stages, masks and JSON written, no
  overlays), seconds per frame end to end.

Rows are labelled with the runtime and precision that ran (the encoder as built, the evaluation's and
the prediction's records), not the one asked for: a runtime that falls back to torch shows as torch.
Absolute times move with the load of a shared machine; the ratios of one run are the figures to read.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import args as args_
from benchmarks.machine import device_info, has_amx
from benchmarks.tables import RESULTS, markdown_table, print_table, write_block
from polypsam.data.embedding_cache import EmbeddingCache, file_digest
from polypsam.data.io import read_image
from polypsam.devices import usable_cpus
from polypsam.evaluation.runner import run_evaluation
from polypsam.evaluation.settings import EvalSettings
from polypsam.inference import preprocess
from polypsam.models import build_model
from polypsam.prediction import plan_jobs, run_prediction
from polypsam.prompts import build_prompt
from polypsam.runtime import RuntimeSettings, build_frozen_encoder, describe

CHOICES = [("torch", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")]
CPU = torch.device("cpu")


def images(folder: Path, n: int) -> list[Path]:
    return sorted((folder / "images").iterdir())[:n]


def canvases(paths: list[Path], spec) -> tuple[torch.Tensor, torch.Tensor]:
    pre = [preprocess(read_image(p), spec) for p in paths]
    return torch.stack([c for c, _ in pre]), torch.tensor([rz.input_hw for _, rz in pre])


def build_encoders(net, choices=CHOICES, store: str = "") -> dict:
    """(runtime, precision) asked for -> the encoder built for it, which may be torch (a fall-back)."""
    return {choice: build_frozen_encoder(net, RuntimeSettings(*choice, store), CPU) for choice in choices}


def encoder_rows(net, encoders: dict, paths: list[Path]) -> list[list[str]]:
    """The reference is the first encoder (torch fp32)."""
    x, hw = canvases(paths, net.spec)
    best, embeddings = {}, {}
    for enc in encoders.values():
        enc.encode(x[:1], hw[:1])  # warm-up
    for _ in range(2):  # rounds interleave the runtimes, so a burst of load hits them alike
        for choice, enc in encoders.items():
            t0 = time.perf_counter()
            embeddings[choice] = enc.encode(x, hw)
            best[choice] = min(best.get(choice, float("inf")), (time.perf_counter() - t0) / len(x))
    ref = next(iter(encoders))
    rows = []
    for choice, enc in encoders.items():
        err = max(float((e - r).norm() / r.norm()) for e, r in zip(embeddings[choice], embeddings[ref]))
        rows.append([describe(enc), f"{best[choice] * 1000:.0f}", f"{1 / best[choice]:.2f}",
                     f"{best[ref] / best[choice]:.2f}x", f"{err:.1e}"])
    return rows


def cache_fill_rows(net, encoders: dict, paths: list[Path]) -> list[list[str]]:
    rows, base = [], None
    for enc in encoders.values():
        with tempfile.TemporaryDirectory() as tmp:
            cache = EmbeddingCache(tmp, enc.model_key())
            t0 = time.perf_counter()
            for p in paths:
                canvas, rz = preprocess(read_image(p), net.spec)
                cache.save(file_digest(p), enc.encode(canvas[None], torch.tensor([rz.input_hw]))[0])
            per = (time.perf_counter() - t0) / len(paths)
        base = base or per
        rows.append([describe(enc), f"{per:.2f}", f"{base / per:.2f}x", f"{per * 1205 / 60:.0f}"])
    return rows


def _evaluate(net, root: Path, runtime: str, precision: str, limit: int | None):
    """Seconds per image, Dice and images per set, and the encoder that ran (the evaluation's record)."""
    settings = EvalSettings(noise=(), save_masks=False, figures=False, device="cpu", num_workers=1,
                            runtime=RuntimeSettings(runtime, precision))
    with tempfile.TemporaryDirectory() as tmp:
        res = run_evaluation(net, root, tmp, settings, limit_test=limit, verbose=False)
    return (res.meta["wall_seconds"] / res.meta["n_images"], {r["dataset"]: (r["dice"], r["n_images"])
            for r in res.summary.to_dict("records")}, res.meta["encoder_runtime"])


def evaluate_rows(net, root: Path, limit: int) -> list[list[str]]:
    """Seconds per image of every runtime on the same ``limit`` images per test set."""
    rows, base = [], None
    for runtime, precision in CHOICES:
        per, dice, ran = _evaluate(net, root, runtime, precision, limit)
        base = base or per
        rows.append([ran, f"{per:.2f}", f"{base / per:.2f}x",
                     "; ".join(f"{k} {d:.4f}" for k, (d, _) in dice.items())])
    return rows


def dice_rows(net, root: Path, limit: int | None) -> tuple[list[str], list[list[str]]]:
    """OpenVINO fp32 (torch's embeddings within 1e-5) against bf16 on the whole dev test sets: the columns,
    named after the encoders that ran, and the rows."""
    _, exact, exact_ran = _evaluate(net, root, "openvino", "fp32", limit)
    _, bf16, bf16_ran = _evaluate(net, root, "openvino", "bf16", limit)
    cols = ["set", "images", f"Dice {exact_ran}", f"Dice {bf16_ran}", "change"]
    return cols, [[k, str(n), f"{d:.4f}", f"{bf16[k][0]:.4f}", f"{bf16[k][0] - d:+.4f}"]
                  for k, (d, n) in exact.items()]


def predict_rows(net, folder: Path, n: int) -> list[list[str]]:
    prompt = build_prompt({"type": "auto"})
    rows, base = [], None
    for runtime, precision in CHOICES:
        plan = plan_jobs(str(folder / "images"), None, None, prompt, n)
        with tempfile.TemporaryDirectory() as tmp:
            s = run_prediction(net, plan, tmp, batch_size=1, num_workers=1, device="cpu", overlays=False,
                               progress=False, prompt=prompt, runtime=RuntimeSettings(runtime, precision))
        base = base or s["seconds_per_image"]
        per = s["seconds_per_image"]
        rows.append([s["encoder_runtime"], f"{per:.3f}", f"{base / per:.2f}x"])
    return rows


def main(argv=None) -> None:
    p = args_.parser(__doc__)
    args_.add_data_root(p)
    p.add_argument("--smoke", action="store_true", help="two images per section, nothing written to RESULTS.md")
    p.add_argument("--results", default=None, help=f"markdown file to update (default {RESULTS}; none for --smoke)")
    p.add_argument("--limit", type=int, default=10, help="images per test set in the timed evaluation")
    args = p.parse_args(argv)
    root = Path(args.data_root)
    small = 2 if args.smoke else None
    torch.set_num_threads(usable_cpus())
    info = device_info(CPU)
    amx = has_amx()
    net = build_model("lite").eval()
    encoders = build_encoders(net)
    kvasir = root / "TestDataset" / "Kvasir"
    sections = [
        ("encoder", ["runtime", "ms/img", "img/s", "vs torch", "max rel. error"],
         encoder_rows(net, encoders, images(kvasir, small or 8))),
        ("cache fill", ["runtime", "s/img", "vs torch", "1,205 images, min"],
         cache_fill_rows(net, encoders, images(root / "TrainDataset", small or 16))),
        ("evaluate", ["runtime", "s/img", "vs torch", f"Dice, {small or args.limit} images per set"],
         evaluate_rows(net, root, small or args.limit)),
        ("bf16 Dice on the dev test sets", *dice_rows(net, root, small)),
        ("predict prompt=auto", ["runtime", "s/frame", "vs torch"], predict_rows(net, kvasir, small or 8)),
    ]
    info["loadavg_end"] = os.getloadavg()[0]
    head = (f"{info['name']} ({'AMX bf16' if amx else 'no AMX'}), {usable_cpus()} cores used, load average "
            f"{info['loadavg_start']:.1f} at start and {info['loadavg_end']:.1f} at end (shared), torch {info['torch']}, "
            f"{info['date']}")
    text = [head]
    for title, cols, rows in sections:
        print_table(f"{title} ({head})", cols, rows)
        text += ["", f"**{title}**", "", markdown_table(cols, rows)]
    target = args_.results_file(args)
    if target:
        write_block(target, "runtimes cpu", "\n".join(text))
        print(f"updated {target}")


if __name__ == "__main__":
    main()
