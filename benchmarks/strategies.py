"""LoRA against enc_dec against dec, side by side: training-step speed, peak memory, checkpoint size.

    PYTHONPATH=src python -m benchmarks.strategies                  # CPU: lite at 256 px, vit_b at 224 px
    PYTHONPATH=src python -m benchmarks.strategies --device cuda    # GPU: vit_b and lite at their real sizes
    PYTHONPATH=src python -m benchmarks.strategies --smoke          # seconds, the tiny model (tests)

The step is ``benchmarks.step``'s (``PolypSAMModule._step``, backward, AdamW, random weights, one box per
image), and so are the timing and the peak memory (CPU: a forked child per case, its peak resident set;
GPU: ``max_memory_allocated``, autocast bf16). dec recomputes its frozen encoder every step (no embedding
cache, so the three rows do the same forward). The checkpoint is what a run writes after one step:
``PolypSAMModule.on_save_checkpoint``'s state (LoRA keeps only what trains) and the AdamW state.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from benchmarks import args as args_
from benchmarks.machine import (
    describe,
    device_info,
    in_child,
    measure_cpu_peak_gflops,
    pick_device,
    with_threads,
)
from benchmarks.step import Case, Result, Stepper, run_case
from benchmarks.tables import fmt, markdown_table, print_table, ratio, write_block

STRATEGY_ORDER = ("dec", "enc_dec", "lora")


def cases(device: str, models: list[str], smoke: bool) -> list[Case]:
    if smoke:
        models = ["tiny"]
    elif device == "cpu":  # 224 px: SAM's ViT at full width and depth in a CPU's time (benchmarks.train_throughput)
        models = [m if m == "lite" else f"{m}@224" for m in models]
    batch = {"lite": 16, "vit_b": 4, "vit_l": 2, "vit_h": 1}
    return [Case(m, strategy=s, batch=1 if device == "cpu" else batch.get(m, 1), attention="sdpa")
            for m in models for s in STRATEGY_ORDER]


def checkpoint_facts(case: Case, device: torch.device) -> dict:
    """Trainable parameters and the size of the checkpoint a run writes after one step."""
    stepper = Stepper.for_case(case, device)
    stepper.step()
    module = stepper.module
    ckpt = {"state_dict": module.state_dict(), "optimizer_states": [stepper.opt.state_dict()]}
    module.on_save_checkpoint(ckpt)
    with tempfile.NamedTemporaryFile(suffix=".ckpt") as f:
        torch.save(ckpt, f.name)
        size = os.path.getsize(f.name)
    return {"trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "checkpoint_mib": size / 2**20}


def measure(case: Case, device: torch.device, steps: int, warmup: int, threads: int) -> Result:
    if device.type == "cuda":
        res = run_case(case, device, steps, warmup, count_flops=False)
        res.extra.update(checkpoint_facts(case, device))
        return res
    status, res = in_child(with_threads, threads, run_case, case, device, steps, warmup, False)
    if status != "ok":
        return Result(case, error=res)
    status, facts = in_child(with_threads, threads, checkpoint_facts, case, device)
    res.extra.update(facts if status == "ok" else {})
    return res


def rows(results: list[Result]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "strategy", "batch", "trainable params", "img/s", "step ms", "peak MiB", "checkpoint MiB",
            "speed x enc_dec", "memory x enc_dec", "checkpoint x enc_dec"]
    ref = {r.case.model: r for r in results if r.case.strategy == "enc_dec" and not r.error}
    out = []
    for r in results:
        e, x = ref.get(r.case.model), r.extra
        if r.error:
            out.append([r.case.model, r.case.strategy, str(r.case.batch), r.error] + ["-"] * (len(head) - 4))
            continue
        out.append([r.case.model, r.case.strategy, str(r.case.batch), fmt(x.get("trainable"), ",d"),
                    fmt(r.images_per_s, ".3g"), fmt(r.step_ms, ".4g"), fmt(r.peak_mib, ".0f"),
                    fmt(x.get("checkpoint_mib"), ".1f"),
                    ratio(r.images_per_s, e and e.images_per_s), ratio(r.peak_mib, e and e.peak_mib),
                    ratio(x.get("checkpoint_mib"), e and e.extra.get("checkpoint_mib"))])
    return head, out


def parse_args(argv=None):
    p = args_.parser(__doc__)
    args_.add_device(p)
    p.add_argument("--models", default="lite,vit_b", help="comma list from lite, vit_b, vit_l, vit_h")
    args_.add_steps(p)
    args_.add_outputs(p, "marker name (default 'strategies <cpu|cuda>')",
                      "the tiny model, one step each: checks the script")
    return p.parse_args(argv)


def main(argv=None) -> list[Result]:
    args = parse_args(argv)
    device = pick_device(args.device)
    dev, gpu = device.type, device.type == "cuda"
    if not gpu:
        torch.set_num_threads(1)  # the parent stays single-threaded; cases run forked with args.threads
    steps, warmup = args_.step_counts(args, gpu)
    info = device_info(device)
    if not gpu:
        info["threads"] = args.threads
        info["peak_gflops"] = in_child(with_threads, args.threads, measure_cpu_peak_gflops, 0.3)[1]
    run_case(Case("tiny", batch=1), device, steps=1, warmup=1, count_flops=False)  # one-off allocations
    import peft.tuners.lora  # noqa: F401 - imported once here: no forked case counts its import in its peak
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    results = [measure(c, device, steps, warmup, args.threads) for c in cases(dev, models, args.smoke)]
    if not gpu:
        info["loadavg_end"] = os.getloadavg()[0]
    head, table = rows(results)
    print_table(f"strategies on {dev}: {steps} timed steps after {warmup} warm-up", head, table)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": info, "steps": steps, "warmup": warmup,
                                               "cases": [r.to_json() for r in results]}, indent=1, default=str))
    results_file = args_.results_file(args)
    if results_file:
        text = (f"Measured {info['date']} on {describe(info)}; {steps} timed steps after {warmup} warm-up, "
                f"median step (CPU) or mean (GPU).\n\n{markdown_table(head, table)}\n")
        write_block(results_file, args.block or f"strategies {dev}", text)
    return results


if __name__ == "__main__":
    main()
