"""Freezing strategies: which parts of SAM train."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from polypsam.errors import ConfigError
from polypsam.models.sam import BOX_ONLY_UNUSED

STRATEGIES = {
    "dec": ("image_encoder", "prompt_encoder"),  # the paper's "Dec": only the mask decoder trains
    "enc_dec": (),  # the paper's "Enc Dec": everything trains
}


def freeze_strategy(net: nn.Module, freeze: Sequence[str], freeze_box_unused: bool = True) -> list[str]:
    """Freeze each named submodule (dotted path) and return the frozen module names.

    ``freeze_box_unused`` also freezes the parameters that box-only, single-mask training never
    reaches (see ``BOX_ONLY_UNUSED``), so DDP needs no ``find_unused_parameters``.
    """
    names = dict(net.named_modules())
    frozen = []
    for path in list(freeze) + (list(BOX_ONLY_UNUSED) if freeze_box_unused else []):
        if path not in names:
            if path in BOX_ONLY_UNUSED:
                continue  # a model family without this part
            tops = [n for n, _ in net.named_children()]
            raise ConfigError(f"strategy.freeze: {path!r} is not a submodule of the model; use dotted paths such "
                              f"as {', '.join(tops)} or image_encoder.blocks.0.")
        for p in names[path].parameters():
            p.requires_grad_(False)
        frozen.append(path)
    return frozen


def parameter_counts(net: nn.Module) -> dict[str, dict[str, int]]:
    """Trainable and frozen parameter counts per top-level part and in total."""
    out = {}
    for name, mod in list(net.named_children()) + [("total", net)]:
        tr = sum(p.numel() for p in mod.parameters() if p.requires_grad)
        fr = sum(p.numel() for p in mod.parameters() if not p.requires_grad)
        out[name] = {"trainable": tr, "frozen": fr}
    return out
