"""LoRA on SAM's image encoder through Hugging Face ``peft``: which layers, how large, and merging back.

``strategy=lora`` builds the model with its image encoder wrapped in peft's ``LoraModel``: the encoder's
own weights are frozen and low-rank adapters train beside the chosen linear layers of its attention
blocks (SAM's ViT blocks, TinyViT's blocks). ``merge_lora`` folds the adapters into the weights and
unwraps the encoder, giving back the plain layout that segment_anything and LiteMedSAM load.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from torch import nn

from polypsam.errors import ConfigError

ADAPTER = "default"  # peft's adapter name; one adapter per model


def _loaded_peft() -> ModuleType | None:
    """peft's LoRA module once imported (only ``apply_lora`` imports it: seconds, and transformers with it).

    Before that no model can hold a LoRA layer, so the checks below need not import it.
    """
    return sys.modules.get("peft.tuners.lora")


@dataclass(frozen=True)
class LoraSettings:
    """The ``strategy.lora`` block (conf/strategy/lora.yaml)."""

    target_modules: tuple[str, ...] = ("attn.qkv", "attn.proj")  # names inside a block; a suffix is enough
    rank: int = 8
    alpha: float = 8.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input, in training
    blocks: tuple[int, ...] | None = None  # indices of the encoder's attention blocks; None: all of them

    def __post_init__(self):
        if not self.target_modules:
            raise ConfigError("strategy.lora.target_modules is empty: name the layers to adapt, e.g. [attn.qkv].")
        if int(self.rank) < 1:
            raise ConfigError(f"strategy.lora.rank={self.rank}: choose a rank of 1 or more (e.g. 8).")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"strategy.lora.dropout={self.dropout}: choose a probability in [0, 1).")


def lora_settings(cfg: Mapping[str, Any] | LoraSettings) -> LoraSettings:
    """``LoraSettings`` from the config block, with an error naming any unknown key."""
    if isinstance(cfg, LoraSettings):
        return cfg
    d = dict(cfg)
    fields = [f.name for f in dataclasses.fields(LoraSettings)]
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"strategy.lora: unknown setting(s) {', '.join(unknown)}; it takes {', '.join(fields)}.")
    for key in ("target_modules", "blocks"):
        if d.get(key) is not None:
            d[key] = tuple(d[key]) if isinstance(d[key], (list, tuple)) else (d[key],)
    return LoraSettings(**d)


def attention_blocks(encoder: nn.Module) -> list[tuple[str, nn.Module]]:
    """The encoder's attention blocks in order (modules with an ``attn`` child), with their names."""
    return [(name, m) for name, m in encoder.named_modules() if isinstance(getattr(m, "attn", None), nn.Module)]


def _adaptable(block: nn.Module, block_name: str) -> list[tuple[str, str]]:
    """(name inside the block, full name in the encoder) of each layer peft can adapt."""
    inner = [n for n, m in block.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    full = [n for n, m in block.named_modules(prefix=block_name) if isinstance(m, (nn.Linear, nn.Conv2d))]
    return list(zip(inner, full))


def _matches(inner: str, target: str) -> bool:
    return inner == target or inner.endswith(f".{target}")


def target_layers(encoder: nn.Module, settings: LoraSettings, model: str = "this model") -> list[str]:
    """Full names of the layers that get adapters; a setting that selects nothing is a ConfigError."""
    blocks = attention_blocks(encoder)
    if not blocks:
        raise ConfigError(f"strategy=lora: the {model} image encoder has no attention blocks to adapt.")
    chosen = range(len(blocks)) if settings.blocks is None else settings.blocks
    bad = [i for i in chosen if not 0 <= int(i) < len(blocks)]
    if bad:
        raise ConfigError(f"strategy.lora.blocks: {bad} out of range; the {model} image encoder has "
                          f"{len(blocks)} attention blocks (0-{len(blocks) - 1}); null adapts all of them.")
    layers = [pair for i in chosen for pair in _adaptable(blocks[int(i)][1], blocks[int(i)][0])]
    available = sorted({inner for inner, _ in layers})
    for target in settings.target_modules:
        if not any(_matches(inner, target) for inner, _ in layers):
            raise ConfigError(f"strategy.lora.target_modules: {target!r} matches no layer of the {model} image "
                              f"encoder's attention blocks; available: {', '.join(available)}.")
    return [full for inner, full in layers if any(_matches(inner, t) for t in settings.target_modules)]


def apply_lora(net: nn.Module, settings: LoraSettings | Mapping[str, Any], model: str = "this model") -> int:
    """Wrap ``net.image_encoder`` in peft's ``LoraModel``; returns how many layers got an adapter.

    peft freezes every weight of the encoder except the adapters; other parts of ``net`` are untouched.
    """
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    settings = lora_settings(settings)
    targets = target_layers(net.image_encoder, settings, model)
    config = LoraConfig(r=int(settings.rank), lora_alpha=settings.alpha, lora_dropout=float(settings.dropout),
                        target_modules=targets, bias="none")
    net.image_encoder = LoraModel(net.image_encoder, config, ADAPTER)
    return len(targets)


def has_lora(net: nn.Module) -> bool:
    peft_lora = _loaded_peft()
    return peft_lora is not None and isinstance(getattr(net, "image_encoder", None), peft_lora.LoraModel)


def adapter_parameters(net: nn.Module) -> set[int]:
    """ids of the LoRA adapters' own parameters (not those of the layers they adapt)."""
    out: set[int] = set()
    if not has_lora(net):
        return out
    for m in net.modules():
        if isinstance(m, _loaded_peft().LoraLayer):
            base = {id(p) for p in m.get_base_layer().parameters()}
            out |= {id(p) for p in m.parameters() if id(p) not in base}
    return out


def merge_lora(net: nn.Module) -> nn.Module:
    """Fold the adapters into the encoder's weights and unwrap it (in place); returns ``net``."""
    if not has_lora(net):
        raise ConfigError("merge: this model has no LoRA adapters (it was not trained with strategy=lora).")
    net.image_encoder = net.image_encoder.merge_and_unload()
    return net


def frozen_outside_adapters(net: nn.Module) -> list[str]:
    """The largest submodules of the image encoder without a trainable parameter, LoRA layers left out.

    Listed as frozen modules they stay in eval mode while training (TinyViT's BatchNorm statistics do
    not move), while the LoRA layers follow the run's mode (their dropout is active in training).
    """
    if not has_lora(net):
        return []
    layer = _loaded_peft().LoraLayer
    out: list[str] = []
    done: set[int] = set()
    for name, m in net.image_encoder.named_modules(prefix="image_encoder"):
        if id(m) in done:
            continue
        if isinstance(m, layer):
            done |= {id(x) for x in m.modules()}
        elif not any(p.requires_grad for p in m.parameters()) and not any(isinstance(x, layer) for x in m.modules()):
            out.append(name)
            done |= {id(x) for x in m.modules()}
    return out
