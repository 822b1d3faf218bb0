"""Freezing strategies: which parts of SAM train."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from polypsam.errors import ConfigError

STRATEGIES = {
    "dec": ("image_encoder", "prompt_encoder"),  # the paper's "Dec": only the mask decoder trains
    "enc_dec": (),  # the paper's "Enc Dec": everything trains
}


def freeze_strategy(net: nn.Module, freeze: Sequence[str], prompt_unused: Sequence[str] = ()) -> list[str]:
    """Freeze each named submodule (dotted path) and return the frozen module names.

    ``prompt_unused`` names the parts that the run's prompt type never reaches (``PromptType.
    unused_parameters``): freezing them keeps DDP free of unused trainable parameters without
    ``find_unused_parameters``. A model family without one of them skips it.
    """
    names = dict(net.named_modules())
    frozen = []
    for path in list(freeze) + [p for p in prompt_unused if p not in freeze]:
        if path not in names:
            if path in prompt_unused:
                continue
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
