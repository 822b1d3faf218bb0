"""Freezing strategies: which parts of SAM train (``strategy=lora``'s adapters are built with the model)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from polypsam.errors import ConfigError
from polypsam.models.lora import frozen_outside_adapters
from polypsam.models.registry import takes_prompts

STRATEGIES = {
    "dec": ("image_encoder", "prompt_encoder"),  # the paper's "Dec": only the mask decoder trains
    "enc_dec": (),  # the paper's "Enc Dec": everything trains
    "lora": (),  # the encoder's own weights are frozen by peft; its adapters, prompt encoder and decoder train
}


def freeze_strategy(net: nn.Module, freeze: Sequence[str], prompt_unused: Sequence[str] = ()) -> list[str]:
    """Freeze each named submodule (dotted path) and return the frozen module names.

    ``prompt_unused`` names the parts that the run's prompt type never reaches (``PromptType.
    unused_parameters``): freezing them keeps DDP free of unused trainable parameters without
    ``find_unused_parameters``. A model family without one of them skips it. With LoRA adapters the
    image encoder's frozen layers are listed too, so that they stay in eval mode (``models.lora``).
    """
    names = dict(net.named_modules())
    frozen = []
    for path in list(freeze) + [p for p in prompt_unused if p not in freeze]:
        if path not in names:
            if path in prompt_unused:
                continue
            tops = [n for n, _ in net.named_children()]
            if not takes_prompts(net):
                raise ConfigError(f"strategy.freeze: {path!r} is not a part of {net.spec.name}, a prompt-free baseline "
                                  f"({', '.join(tops)}): strategy=enc_dec trains it whole, strategy=custom "
                                  "'strategy.freeze=[image_encoder]' keeps its encoder fixed.")
            raise ConfigError(f"strategy.freeze: {path!r} is not a submodule of the model; use dotted paths such "
                              f"as {', '.join(tops)} or image_encoder.blocks.0.")
        for p in names[path].parameters():
            p.requires_grad_(False)
        frozen.append(path)
    return frozen + frozen_outside_adapters(net)


def parameter_counts(net: nn.Module) -> dict[str, dict[str, int]]:
    """Trainable and frozen parameter counts per top-level part and in total."""
    out = {}
    for name, mod in list(net.named_children()) + [("total", net)]:
        tr = sum(p.numel() for p in mod.parameters() if p.requires_grad)
        fr = sum(p.numel() for p in mod.parameters() if not p.requires_grad)
        out[name] = {"trainable": tr, "frozen": fr}
    return out
