"""What makes an encoder-training step cheaper on a CPU: LiteMedSAM enc_dec and LoRA steps, side by side.

    PYTHONPATH=src python -m benchmarks.encoder_steps            # LiteMedSAM, 256 px, batch 4 (the study rows')
    PYTHONPATH=src python -m benchmarks.encoder_steps --smoke    # the tiny SAM: checks the script

A step is ``benchmarks.step.Stepper``'s (``PolypSAMModule._step``, backward, AdamW) at the study rows'
precision, fp32. Variants of one strategy start from the same random weights and alternate round by round,
so that they share the machine's load; the best step of each is kept, and the ratio is to the plain step.

- ``channels_last``: ``model.channels_last=true``, the encoder's conv weights (and so its activations) in NHWC,
  oneDNN's preferred layout.
- ``compiled``: ``model.compile=true`` (inductor; the first step compiles, outside the timing).
- ``checkpointed``: TinyViT's own ``use_checkpoint`` in every stage (activations recomputed in backward).
- ``stage 0 frozen``: ``strategy.freeze=[image_encoder.patch_embed, image_encoder.layers.0]`` (enc_dec only):
  the conv stem and first MBConv stage in eval mode without gradients. It changes what trains.
- ``bf16``: autocast, only where the CPU has AMX (``benchmarks.cpu_bf16`` measures it everywhere).

Equivalence: the same batch's loss and gradient norm against the plain step's, from the same weights. A variant
within float tolerance leaves the Dice unchanged by construction; one that changes what trains (stage 0 frozen)
needs a twin run before a study row adopts it.
"""

from __future__ import annotations

import time

import torch

from benchmarks import args as args_
from benchmarks.machine import device_info, has_amx
from benchmarks.step import Case, Stepper, case_config
from benchmarks.tables import RESULTS, markdown_table, print_table, write_block
from polypsam.devices import usable_cpus
from polypsam.training.build import build_module

CPU = torch.device("cpu")
STAGE0 = ["image_encoder.patch_embed", "image_encoder.layers.0"]


def variants(model: str, strategy: str, amx: bool) -> list[str]:
    names = ["plain", "channels_last", "checkpointed"] + (["compiled"] if model == "lite" else [])  # smoke: seconds
    if strategy == "enc_dec" and model == "lite":  # STAGE0 names TinyViT's parts
        names.append("stage 0 frozen")
    if amx:
        names.append("bf16")
    return names


def build(model: str, strategy: str, batch: int, variant: str) -> Stepper:
    cfg = case_config(Case(model, strategy=strategy, batch=batch, compile=variant == "compiled"), CPU)
    if variant == "stage 0 frozen":
        cfg.strategy.name, cfg.strategy.freeze = "custom", STAGE0
    cfg.model.channels_last = variant == "channels_last"
    torch.manual_seed(0)  # every variant starts from the same random weights
    module = build_module(cfg)
    if variant == "checkpointed":  # TinyViT's own switch; polypsam's gradient_checkpointing covers SAM's ViT blocks
        for m in module.net.image_encoder.modules():
            if hasattr(m, "use_checkpoint"):
                m.use_checkpoint = True
    return Stepper(module, batch, CPU, dtype=torch.bfloat16 if variant == "bf16" else None)


def loss_and_grad(stepper: Stepper) -> tuple[float, float]:
    """The batch's loss and the gradient norm over what trains, before any optimiser step."""
    ctx = torch.autocast("cpu", dtype=stepper.dtype) if stepper.dtype else torch.autocast("cpu", enabled=False)
    with ctx:
        loss, _ = stepper.module._step(stepper.batch)
    loss.backward()
    grads = [p.grad.norm() for p in stepper.module.net.parameters() if p.grad is not None]
    norm = torch.stack(grads).norm().item()
    stepper.opt.zero_grad(set_to_none=True)
    return loss.item(), norm


def best_step(stepper: Stepper, steps: int) -> float:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        stepper.step()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(model: str, strategy: str, batch: int, names: list[str], rounds: int, steps: int) -> list[list[str]]:
    steppers = {n: build(model, strategy, batch, n) for n in names}
    checks = {n: loss_and_grad(s) for n, s in steppers.items()}  # also the warm-up (and the compile)
    for s in steppers.values():
        s.step()
    best = {n: float("inf") for n in names}
    for _ in range(rounds):
        for n, s in steppers.items():
            best[n] = min(best[n], best_step(s, steps))
    loss0, grad0 = checks["plain"]
    rows = []
    for n in names:
        loss, grad = checks[n]
        rows.append([f"{strategy} {n}", f"{best[n]:.2f}", f"{best['plain'] / best[n]:.2f}x",
                     f"{abs(loss - loss0):.1e}", f"{abs(grad - grad0) / grad0:.1e}"])
        print(f"[encoder_steps] {strategy} {n}: {best[n]:.2f} s, loss {loss:.6f}, grad norm {grad:.6f}", flush=True)
    return rows


def main(argv=None) -> None:
    p = args_.parser(__doc__)
    p.add_argument("--rounds", type=int, default=2, help="alternations of the variants")
    p.add_argument("--steps", type=int, default=1, help="timed steps per variant and round")
    p.add_argument("--batch", type=int, default=4, help="images per step (the study rows': 4)")
    p.add_argument("--strategies", nargs="+", default=["enc_dec", "lora"], choices=["enc_dec", "lora"])
    p.add_argument("--smoke", action="store_true", help="the tiny SAM, one round: checks the script")
    args = p.parse_args(argv)
    torch.set_num_threads(usable_cpus())
    model, rounds, batch = ("tiny", 1, 2) if args.smoke else ("lite", args.rounds, args.batch)
    amx = has_amx()
    info = device_info(CPU)
    rows = []
    for strategy in args.strategies:
        rows += measure(model, strategy, batch, variants(model, strategy, amx), rounds, args.steps)
    head = (f"{info['name']} ({'AMX bf16' if amx else 'no AMX: bf16 not run, see cpu_bf16'}), {usable_cpus()} "
            f"threads, load average {info['loadavg_start']:.1f} at start, torch {info['torch']}, {info['date']}; "
            f"{model} at batch {batch}, fp32, best of {rounds} rounds x {args.steps} step(s)")
    cols = ["training step", "s / step", "speed-up", "loss, abs. difference to plain",
            "grad norm, relative difference to plain"]
    print_table(f"Encoder-training steps ({head})", cols, rows)
    if not args.smoke:
        write_block(RESULTS, "encoder_steps cpu", "\n".join([head, "", markdown_table(cols, rows)]))
        print(f"updated {RESULTS}")


if __name__ == "__main__":
    main()
