"""Training steps on a CPU in fp32 and in bf16 autocast, side by side in one process.

    PYTHONPATH=src python -m benchmarks.cpu_bf16            # LiteMedSAM and the U-Nets, a few minutes
    PYTHONPATH=src python -m benchmarks.cpu_bf16 --smoke    # the tiny SAM and a small U-Net (tests)

A step is ``PolypSAMModule._step`` (the module's loss), backward and AdamW (``benchmarks.step.Stepper``),
on random weights and a random batch: LiteMedSAM decoder-only from cached embeddings (batch 8), LoRA and
enc_dec (batch 2), and the study's U-Net and U-Net++ (resnet18, light decoder, 256 px, batch 8). Each
case alternates fp32 and bf16 rounds so that both see the same load; the best step of each precision is
kept. bf16 pays where the CPU has AMX (Intel Xeon 4th generation and later); elsewhere it may be slower.
Whether the Dice holds in bf16 is a training question, answered by runs, not here.
"""

from __future__ import annotations

import time

import torch

from benchmarks import args as args_
from benchmarks.machine import device_info, has_amx
from benchmarks.step import Case, Stepper, run_config
from benchmarks.tables import RESULTS, markdown_table, print_table, write_block
from polypsam.devices import usable_cpus
from polypsam.training.build import build_module

CPU = torch.device("cpu")
UNET = dict(encoder_name="resnet18", encoder_weights=None, arch_kwargs={"decoder_channels": [128, 64, 32, 16, 8]})


def sam(case: Case):
    return lambda dtype: Stepper.for_case(case, CPU, dtype)


def smp(arch: str, size: int, batch: int):
    """A prompt-free baseline as the study trains it: strategy enc_dec, Dice + BCE, no prompt."""
    def make(dtype):
        cfg = run_config({"name": arch, "image_size": size, **UNET}, loss="dice_bce", prompt="none")
        return Stepper(build_module(cfg), batch, CPU, dtype=dtype)
    return make


def cases(smoke: bool) -> list[tuple[str, object]]:
    if smoke:
        return [("tiny dec cached emb, batch 2", sam(Case("tiny", strategy="dec", cache=True, batch=2))),
                ("U-Net 64 px, batch 2", smp("unet", 64, 2))]
    return [("LiteMedSAM dec cached emb, batch 8", sam(Case("lite", strategy="dec", cache=True, batch=8))),
            ("LiteMedSAM LoRA, batch 2", sam(Case("lite", strategy="lora", batch=2))),
            ("LiteMedSAM enc_dec, batch 2", sam(Case("lite", strategy="enc_dec", batch=2))),
            ("U-Net resnet18 256 px, batch 8", smp("unet", 256, 8)),
            ("U-Net++ resnet18 256 px, batch 8", smp("unetplusplus", 256, 8))]


def best_step(stepper: Stepper, steps: int) -> float:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        stepper.step()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(make, rounds: int, steps: int) -> tuple[float, float]:
    steppers = {dt: make(dt) for dt in (None, torch.bfloat16)}
    for s in steppers.values():
        s.step()  # warm-up: first-call allocations, oneDNN kernel choice
    best = {dt: float("inf") for dt in steppers}
    for _ in range(rounds):
        for dt, s in steppers.items():
            best[dt] = min(best[dt], best_step(s, steps))
    return best[None], best[torch.bfloat16]


def main(argv=None) -> None:
    p = args_.parser(__doc__)
    p.add_argument("--rounds", type=int, default=2, help="alternations of fp32 and bf16 per case")
    p.add_argument("--steps", type=int, default=2, help="timed steps per round")
    p.add_argument("--smoke", action="store_true", help="tiny models, one round: checks the script")
    args = p.parse_args(argv)
    torch.set_num_threads(usable_cpus())
    rounds, steps = (1, 1) if args.smoke else (args.rounds, args.steps)
    info = device_info(CPU)
    amx = has_amx()
    rows = []
    for label, make in cases(args.smoke):
        fp32, bf16 = measure(make, rounds, steps)
        rows.append([label, f"{fp32:.3f}", f"{bf16:.3f}", f"{fp32 / bf16:.2f}x"])
        print(f"[cpu_bf16] {label}: fp32 {fp32:.3f} s, bf16 {bf16:.3f} s", flush=True)
    head = (f"{info['name']} ({'AMX bf16' if amx else 'no AMX'}), {usable_cpus()} threads, load average "
            f"{info['loadavg_start']:.1f} at start (shared), torch {info['torch']}, {info['date']}")
    cols = ["training step", "fp32 s", "bf16 autocast s", "bf16 speed-up"]
    print_table(f"CPU training step, fp32 against bf16 ({head})", cols, rows)
    if not args.smoke:
        write_block(RESULTS, "cpu_bf16 cpu", "\n".join([head, "", markdown_table(cols, rows)]))
        print(f"updated {RESULTS}")


if __name__ == "__main__":
    main()
