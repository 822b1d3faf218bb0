"""Why a short enc_dec run can score below zero-shot: the encoder's BatchNorm statistics, or its weights.

    python experiments/encoder_bn_check.py <run> [--json out.json]   # e.g. <runs>/enc_dec_probe/lr_4e-06

The validation Dice of three networks on the run's own validation images (its config: split file, limits,
prompt; the module's validation step through Lightning's ``Trainer.validate``): LiteMedSAM as built (zero-shot),
the run's ``best.ckpt``, and that checkpoint with its image encoder's BatchNorm running statistics put back to
the pretrained ones (every weight as trained). Also how far each kind of encoder tensor moved from the
pretrained model (relative L2). BatchNorm in train mode replaces its running statistics with batch-of-4
estimates at momentum 0.1 whatever the learning rate; if putting them back restores the zero-shot Dice, the
statistics, not the weights, are what the short run changed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf
from torch import nn

from polypsam.config import datamodule_from_cfg, network_from_cfg
from polypsam.training.build import build_module
from polypsam.training.checkpoints import load_model

STATS = ("running_mean", "running_var")


def bn_stats(net: nn.Module) -> dict[str, torch.Tensor]:
    """The image encoder's BatchNorm running statistics, by state-dict name."""
    return {f"image_encoder.{name}.{s}": getattr(m, s) for name, m in net.image_encoder.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) for s in STATS}


def moved(fresh: nn.Module, trained: nn.Module) -> dict[str, float]:
    """Relative L2 change of the encoder's weights and of its BatchNorm statistics, each over all its tensors."""
    a, b = fresh.state_dict(), trained.state_dict()
    stats = set(bn_stats(fresh))
    groups = {"weights": [k for k in a if k.startswith("image_encoder.") and k not in stats
                          and a[k].is_floating_point()], "bn_running_mean": [k for k in stats if k.endswith("mean")],
              "bn_running_var": [k for k in stats if k.endswith("var")]}
    return {g: float(torch.sqrt(sum(((b[k] - a[k]) ** 2).sum() for k in ks)) / torch.sqrt(sum((a[k] ** 2).sum()
            for k in ks))) for g, ks in groups.items()}


def val_dice(cfg, net: nn.Module) -> float:
    module = build_module(cfg, net)
    dm = datamodule_from_cfg(cfg, net.spec.image_size, resize_method=net.spec.resize_method)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    return float(trainer.validate(module, datamodule=dm, verbose=False)[0]["val/dice"])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    cfg = OmegaConf.load(args.run / "config_resolved.yaml")
    cfg.data.embedding_cache.enabled = False  # every network here runs its own encoder
    fresh = network_from_cfg(cfg).eval()
    trained = load_model(args.run / "checkpoints" / "best.ckpt")[0].eval()
    restored = load_model(args.run / "checkpoints" / "best.ckpt")[0].eval()
    with torch.no_grad():
        for key, t in bn_stats(restored).items():
            t.copy_(bn_stats(fresh)[key])
    out = {"run": str(args.run), "moved": moved(fresh, trained), "val_dice": {
        name: val_dice(cfg, net) for name, net in (("zero-shot", fresh), ("trained", trained),
                                                   ("trained, pretrained BatchNorm statistics", restored))}}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
