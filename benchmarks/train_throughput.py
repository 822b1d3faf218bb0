"""Training-step throughput of the SAM variants, side by side: images/s, peak memory, model FLOP utilisation.

    PYTHONPATH=src python -m benchmarks.train_throughput            # CPU: reduced sizes; GPU: real sizes
    PYTHONPATH=src python -m benchmarks.train_throughput --probe    # GPU: which batch sizes fit
    PYTHONPATH=src python -m benchmarks.train_throughput --smoke    # seconds, the tiny model (tests)

A step is what ``PolypSAMModule`` does in training (``benchmarks.step``): the module ``build_module``
builds for a run, forward (``PolypSAMModule._step``, Dice loss), backward, AdamW step, on random weights
(``model.pretrained=false``) and random images with one box each. Axes: model (vit_b, vit_l, lite), strategy (enc_dec; dec recomputing the frozen
encoder; dec from cached embeddings), stock vs ours (stock: segment_anything's attention and NCHW
mask head; sdpa: SDPA attention in encoder and decoder and the channels-last mask head), gradient
checkpointing. GPU: autocast bf16 (fp16 with a gradient scaler where bf16 is missing, e.g. V100);
CPU: fp32.

FLOPs are counted once per case with ``torch.utils.flop_counter.FlopCounterMode`` on the first
(warm-up) step. MFU uses *model* FLOPs: the count of the stock-attention, non-checkpointed path of
the same model and strategy, so recomputation (checkpointing) and the zero columns SDPA's folded
relative-position bias adds are not counted as useful work. Peak: the GPU's dense bf16 (or V100 fp16)
tensor-core figure; on a CPU, a measured fp32 GEMM rate (so CPU "MFU" is relative to that).

Peak memory: CUDA ``max_memory_allocated`` over the timed steps. CPU: each case runs in a forked child
process, so that no case inherits another's freed heap; its peak is the child's peak resident set (VmHWM,
reset through /proc/self/clear_refs) above its size before the model was built.

Results are printed as a table and written into benchmarks/RESULTS.md between markers named after
this script and the device kind (cpu / cuda), so CPU and GPU figures live side by side
(``benchmarks.throughput_report`` writes the block).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks import args as args_
from benchmarks.epochs import epoch_bench
from benchmarks.flops import REAL_FLOPS_HEAD, fill_model_flops, real_flops_rows, real_size_flops
from benchmarks.machine import (
    describe,
    device_info,
    in_child,
    measure_cpu_peak_gflops,
    pick_device,
    with_threads,
)
from benchmarks.step import Case, Result, run_case
from benchmarks.tables import fmt, print_table, write_block
from benchmarks.throughput_report import markdown, table_rows


def _vit_matrix(model: str, batch: int, compile_: bool, full: bool = True) -> list[Case]:
    """``full=False`` (CPU, vit_l): stock, SDPA and the cached decoder step only, for the time budget."""
    cases = [Case(model, attention="stock", batch=batch), Case(model, attention="sdpa", batch=batch)]
    if full:
        cases += [Case(model, attention="stock", ckpt=True, batch=batch),
                  Case(model, attention="sdpa", ckpt=True, batch=batch),
                  Case(model, strategy="dec", attention="sdpa", batch=batch)]
    cases += [Case(model, strategy="dec", cache=True, attention=a, batch=batch) for a in ("stock", "sdpa")]
    if compile_:
        cases.append(Case(model, attention="sdpa", batch=batch, compile=True))
    return cases


def _lite_matrix(batch: int) -> list[Case]:
    """TinyViT has no SAM attention: stock vs sdpa is the mask decoder's attention and head."""
    return [Case("lite", strategy=st, cache=c, attention=a, batch=batch)
            for st, c in (("enc_dec", False), ("dec", False), ("dec", True)) for a in ("stock", "sdpa")]


def default_cases(device: str, models: list[str], compile_: bool, smoke: bool) -> list[Case]:
    if smoke:
        return [Case("tiny", attention="stock", batch=2), Case("tiny", attention="sdpa", batch=2),
                Case("tiny", attention="sdpa", ckpt=True, batch=2), Case("tiny", strategy="dec", batch=2),
                Case("tiny", strategy="dec", cache=True, attention="stock", batch=2),
                Case("tiny", strategy="dec", cache=True, batch=2)]
    cases = []
    for m in models:
        if m == "lite":
            cases += _lite_matrix(32 if device == "cuda" else 1)
        elif device == "cuda":
            cases += _vit_matrix(m, {"vit_b": 8, "vit_l": 4, "vit_h": 2}[m], compile_)
        else:
            # 224 px: 14x14 tokens, exactly one of SAM's 14x14 windows, every block full width and depth.
            cases += _vit_matrix(f"{m}@224", 1, compile_, full=(m == "vit_b"))
    return cases


def probe_cases() -> list[list[Case]]:
    """Ascending batch sizes, stopped at the first that does not fit (GPU only)."""
    return [[Case("vit_b", attention="sdpa", batch=b) for b in (16, 24, 32, 48)],
            [Case("vit_l", attention="sdpa", batch=b) for b in (8, 12, 16)],
            [Case("vit_l", attention="sdpa", ckpt=True, batch=b) for b in (8, 16, 24, 32)]]


def parse_args(argv=None):
    p = args_.parser(__doc__)
    args_.add_device(p)
    p.add_argument("--models", default="vit_b,vit_l,lite", help="comma list from vit_b, vit_l, vit_h, lite")
    args_.add_steps(p, "torch threads on CPU (default 1: on shared cores, OpenMP's spinning barriers made "
                       "2 threads 5-10x slower than 1 here)")
    p.add_argument("--compile", action="store_true", help="add torch.compile'd encoder cases")
    p.add_argument("--probe", action="store_true", help="GPU: batch-size probes (largest batch that fits)")
    p.add_argument("--no-matrix", action="store_true", help="skip the case matrix (e.g. probes only)")
    p.add_argument("--epoch", default="auto", choices=["auto", "on", "off"],
                   help="decoder-only epochs from the embedding cache vs recomputing (auto: on for CPU)")
    p.add_argument("--epoch-model", default="lite")
    p.add_argument("--epoch-images", type=int, default=8)
    p.add_argument("--epoch-repeats", type=int, default=2)
    p.add_argument("--epoch-workers", type=int, default=None, help="loader workers (default: 0 on CPU, 8 on GPU)")
    p.add_argument("--epoch-batch", type=int, default=8, help="dec_lite trains with batch 8")
    args_.add_data_root(p)
    args_.add_outputs(p, "marker name of the block in the results file (default: 'train_throughput <cpu|cuda>')",
                      "the tiny model, one step each: checks the script")
    p.add_argument("--real-flops", default="auto", choices=["auto", "on", "off"],
                   help="model TFLOP per image at the real input sizes (auto: on for a CPU run)")
    p.add_argument("--filter", default=None, help="regular expression: run only the cases whose label matches")
    p.add_argument("--batch", type=int, default=None, help="one batch size for every case of the matrix")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    dev, gpu = device.type, device.type == "cuda"
    if not gpu:  # the parent stays single-threaded (see in_child); cases run with args.threads
        torch.set_num_threads(1)
    torch.set_float32_matmul_precision("high")
    steps, warmup = args_.step_counts(args, gpu)
    info = device_info(device)
    if not gpu:
        info["threads"] = args.threads
        status, peak = in_child(with_threads, args.threads, measure_cpu_peak_gflops, 0.3 if args.smoke else 1.5)
        if status != "ok":
            raise RuntimeError(peak)
        info["peak_gflops"] = peak
    peak_tflops = info.get("peak_tflops") if gpu else info["peak_gflops"] / 1e3
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    out: dict = {"device": info, "steps": steps, "warmup": warmup}

    results: list[Result] = []
    # One-off runtime allocations (kernel libraries, autograd's threads) land in the first case measured:
    # a discarded tiny step takes them instead (in the parent, so every forked case starts with them).
    run_case(Case("tiny", batch=1), device, steps=1, warmup=1, count_flops=False)

    def measure(case: Case, n: int, warm: int, count: bool = True) -> Result:
        if gpu:
            return run_case(case, device, n, warm, count)
        status, res = in_child(with_threads, args.threads, run_case, case, device, n, warm, count)
        return res if status == "ok" else Result(case, error=res)
    if not args.no_matrix:
        for case in default_cases(dev, models, args.compile, args.smoke):
            if args.filter and not re.search(args.filter, case.label):
                continue
            if args.batch:
                case = replace(case, batch=args.batch)
            n = steps if (gpu or args.steps or not case.model.startswith("vit_l")) else 2  # CPU time budget
            print(f"... {case.label} (batch {case.batch}, {n} timed steps)", flush=True)
            results.append(measure(case, n, warmup))
            if args.json:  # as we go: a run cut short by a time limit keeps what it measured
                Path(args.json).write_text(json.dumps({**out, "cases": [r.to_json() for r in results]},
                                                      indent=1, default=str))
        fill_model_flops(results, device, isolate=not gpu)
    head, rows = table_rows(results, peak_tflops)
    if results:
        print_table(f"training step, {info['name']}", head, rows)
    out["cases"] = [r.to_json() for r in results]

    probe_rows = []
    if args.probe and gpu:
        for ladder in probe_cases():
            for case in ladder:
                print(f"... probe {case.label} batch {case.batch}", flush=True)
                r = measure(case, 3, 1, False)
                probe_rows.append([case.label, str(case.batch), "fits" if not r.error else r.error,
                                   fmt(r.images_per_s, ".3g"), fmt(r.peak_mib and r.peak_mib / 1024, ".1f")])
                out.setdefault("probes", []).append(r.to_json())
                if r.error:
                    break
        print_table("batch-size probes", ["case", "batch", "result", "img/s", "peak GiB"], probe_rows)
    elif args.probe:
        print("batch-size probes need a GPU: skipped")

    if not gpu:  # no forks from here on: the parent may use every thread
        torch.set_num_threads(args.threads)
    real = None
    if args.real_flops == "on" or (args.real_flops == "auto" and not gpu and not args.smoke):
        print("... model FLOPs at the real input sizes", flush=True)
        real = real_size_flops(models)
        print_table("model TFLOP per image at the real input size (stock attention)", REAL_FLOPS_HEAD,
                    real_flops_rows(real))
    out["real_size_tflops"] = real

    epoch = None
    run_epoch = args.epoch == "on" or (args.epoch == "auto" and (not gpu or args.smoke))
    if run_epoch:
        root = Path(args.data_root)
        if (root / "TrainDataset").is_dir():
            model = "tiny" if args.smoke else args.epoch_model
            n = 4 if args.smoke else args.epoch_images
            print(f"... epochs: {model}, strategy dec, {n} real images, batch {args.epoch_batch}", flush=True)
            workers = args.epoch_workers if args.epoch_workers is not None else (8 if gpu else 0)
            epoch = epoch_bench(model, root, n, min(args.epoch_batch, n), device, workers=workers,
                                repeats=1 if args.smoke else args.epoch_repeats)
            s = epoch["seconds"]
            print_table(f"decoder-only epochs, {model}, {n} images", ["epoch", "seconds", "img/s"],
                        [[k, f"{v:.3g}", f"{epoch['images_per_s'][k]:.3g}"] for k, v in s.items()])
            print(f"cached-embedding epoch speed-up over recomputing the encoder: "
                  f"{epoch['speedup_warm_vs_recompute']:.1f}x from disk (rounds: "
                  + ", ".join(f"{r:.1f}x" for r in epoch["disk_ratios"]) + "), "
                  f"{epoch['speedup_resident_vs_recompute']:.1f}x resident (rounds: "
                  + ", ".join(f"{r:.1f}x" for r in epoch["resident_ratios"]) + ")")
        else:
            print(f"epoch benchmark skipped: no TrainDataset under {root}")
    out["epoch"] = epoch

    if not gpu:
        info["loadavg_end"] = os.getloadavg()[0]
    print(f"device: {describe(info)}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    target = args_.results_file(args)
    if target:
        text = markdown(info, steps, warmup, head, rows, probe_rows, epoch, real)
        write_block(target, args.block or f"train_throughput {info['kind']}", text)
        print(f"wrote {target}")
    return out


if __name__ == "__main__":
    main()
