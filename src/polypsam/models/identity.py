"""The identity of the weights a LoRA run adapts, and checkpoints that hold only what trained.

A LoRA checkpoint stores the trainable state (adapters, prompt encoder, mask decoder) and the sha256 of
the frozen base weights it was trained on, not a second copy of the encoder. Loading it onto a model
checks that digest first and takes every other tensor from the model's own base weights.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from polypsam.errors import CheckpointError
from polypsam.models.frozen import tensor_digest
from polypsam.models.lora import adapter_parameters


def base_weights_sha256(net: nn.Module) -> str:
    """sha256 over every tensor of ``net``'s state except the LoRA adapters (shape, dtype and bytes, in order).

    The same digest with or without adapters: peft keeps the adapted layer's own weights, in place.
    """
    skip = adapter_parameters(net)
    return tensor_digest(t for t in net.state_dict(keep_vars=True).values() if id(t) not in skip)


def trainable_state(module: nn.Module, state: dict, frozen_prefixes: Sequence[str] = ()) -> dict:
    """The entries of ``module``'s ``state`` dict that belong to what trained: parameters with gradients and
    the buffers outside the frozen parts (names of ``module``'s submodules), so that a loaded checkpoint is
    the validated model (a trainable BatchNorm's statistics included)."""
    keep = {name for name, p in module.named_parameters() if p.requires_grad}
    keep |= {name for name, _ in module.named_buffers()
             if not any(name.startswith(f"{f}.") for f in frozen_prefixes)}
    return {k: v for k, v in state.items() if k in keep}


def check_base(saved: str | None, actual: str, source: str) -> None:
    if saved != actual:
        raise CheckpointError(f"{source}: its LoRA adapters were trained on base weights with sha256 {saved}, but "
                              f"this model's base weights have sha256 {actual}; load it with the model and weights "
                              "it was trained on (model, model.checkpoint_dir and model.pretrained of its run).")


def with_base_state(module: nn.Module, saved: dict) -> dict:
    """``saved`` completed with ``module``'s own tensors for every entry it leaves out (the frozen base)."""
    return {**{k: v for k, v in module.state_dict().items() if k not in saved}, **saved}
