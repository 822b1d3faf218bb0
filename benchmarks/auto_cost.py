"""What a frame costs with no human box: ``prompt=none`` against ``prompt=auto``, side by side, one process.

    PYTHONPATH=src python -m benchmarks.auto_cost --ckpt <mixed run>/checkpoints/best.ckpt
    PYTHONPATH=src python -m benchmarks.auto_cost --ckpt <mixed best.ckpt> --proposer <U-Net run>/checkpoints/best.ckpt
    PYTHONPATH=src python -m benchmarks.auto_cost --smoke      # LiteMedSAM zero-shot, one frame

``run_prediction`` end to end (decode, encode, both stages, masks and JSON written, no overlays) on the
same ``--frames`` Kvasir test frames, one runtime (``--runtime``, default OpenVINO fp32), batch 1: seconds
per frame and the ratio to ``none``. Rows: ``none``; ``auto`` with ``conf/prompt/auto.yaml``'s settings;
``auto`` with the checkpoint's ``<stem>.auto.json`` (``python -m polypsam.select_auto``) when it exists;
with ``--proposer``, ``auto`` with that network as stage 1 (and its settings file when it exists). SAM's
encoder runs once per frame in every row (stage 2 reuses stage 1's embeddings; a proposer adds its own
network), so the ratio is the decoders' (and the proposer's) share. Issue 20's budget: auto at most 1.5x
none. Read the ratios; absolute times move with load.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks import args as args_
from benchmarks.machine import device_info
from benchmarks.tables import RESULTS, markdown_table, print_table, write_block
from polypsam.devices import usable_cpus
from polypsam.models import build_model
from polypsam.prediction import plan_jobs, run_prediction
from polypsam.prompts import auto_settings, build_prompt
from polypsam.runtime import RuntimeSettings
from polypsam.training.checkpoints import load_model


def _seconds(net, folder: Path, n: int, prompt, runtime: RuntimeSettings, proposer=None) -> tuple[float, dict]:
    plan = plan_jobs(str(folder / "images"), None, None, prompt, n)
    kw = dict(batch_size=1, num_workers=1, device="cpu", overlays=False, progress=False, prompt=prompt,
              runtime=runtime, proposer=proposer)
    with tempfile.TemporaryDirectory() as tmp:
        run_prediction(net, plan, tmp, **kw)  # warm-up: runtime load, first-call costs
    with tempfile.TemporaryDirectory() as tmp:
        s = run_prediction(net, plan, tmp, **kw)
    return s["seconds_per_image"], s


def rows(net, ckpt: str | None, folder: Path, n: int, runtime: RuntimeSettings, proposer: str | None = None,
         proposer_settings: str | None = None) -> list[list[str]]:
    auto = build_prompt({"type": "auto"})
    prompts = [("none", build_prompt({"type": "none"}), None), ("auto, conf/prompt/auto.yaml", auto, None)]
    if ckpt and auto_settings.beside(ckpt).is_file():
        chosen, _ = auto_settings.resolve(auto, ckpt, net.spec, explicit=set())
        prompts.append((f"auto, {auto_settings.beside(ckpt).name}", chosen, None))
    if proposer:
        other = build_prompt({"type": "auto", "proposer": proposer, "settings": proposer_settings or "auto"})
        chosen, record = auto_settings.resolve(other, ckpt, net.spec, explicit=set())
        file = Path(record["file"]).name if record else "conf/prompt/auto.yaml"
        prompts.append((f"auto, stage 1 {Path(proposer).parent.parent.name}, {file}", chosen,
                        load_model(proposer)[0].eval()))
    out, base = [], None
    for label, prompt, first in prompts:
        per, _ = _seconds(net, folder, n, prompt, runtime, first)
        base = base or per
        out.append([label, f"{per:.3f}", f"{per / base:.2f}x"])
    return out


def main(argv=None) -> None:
    p = args_.parser(__doc__)
    p.add_argument("--ckpt", default=None, help="a prompt=mixed checkpoint (default: LiteMedSAM zero-shot)")
    args_.add_data_root(p)
    p.add_argument("--proposer", default=None, help="a prompt-free checkpoint (a U-Net) as auto's stage 1")
    p.add_argument("--proposer-settings", default=None, help="its settings file (default: the one beside --ckpt)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--runtime", default="openvino", help="the frozen encoder's runtime (model.runtime)")
    p.add_argument("--precision", default="fp32", help="its precision (model.runtime_precision): fp32 or bf16")
    p.add_argument("--smoke", action="store_true", help="one frame, nothing written to RESULTS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(usable_cpus())
    net = load_model(args.ckpt)[0].eval() if args.ckpt else build_model("lite").eval()
    n = 1 if args.smoke else args.frames
    info = device_info(torch.device("cpu"))
    table = rows(net, args.ckpt, Path(args.data_root) / "TestDataset" / "Kvasir", n,
                 RuntimeSettings(args.runtime, args.precision), args.proposer,
                 args.proposer_settings)
    head = (f"{info['name']}, {usable_cpus()} cores, load average {info['loadavg_start']:.1f} at start (shared), "
            f"{args.runtime} {args.precision} encoder, {n} Kvasir frames, checkpoint "
            f"{args.ckpt or 'LiteMedSAM zero-shot'}, "
            f"{info['date']}")
    cols = ["prompt", "s/frame", "vs none"]
    print_table(f"auto against none ({head})", cols, table)
    if not args.smoke:
        block = "auto_cost cpu" + ("" if args.precision == "fp32" else f" {args.precision}")
        write_block(RESULTS, block, "\n".join([head, "", markdown_table(cols, table)]))
        print(f"updated {RESULTS}")


if __name__ == "__main__":
    main()
