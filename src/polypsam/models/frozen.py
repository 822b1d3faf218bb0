"""Frozen parts stay frozen: eval mode whenever they run, and their weights and buffers bit-identical.

A frozen part has ``requires_grad=False`` parameters, but that alone does not freeze it: BatchNorm in
train mode normalises with batch statistics and moves its running statistics even under ``no_grad``,
and dropout stays active. Lightning 2.6 never calls ``LightningModule.train()`` during ``fit`` (its loops
save and restore each submodule's own flag around validation), so the modes are set in a hook Lightning
does call, before every training batch (``PolypSAMModule.on_train_batch_start``), and the state is
checked by digest at every checkpoint and at the end of fit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from polypsam.errors import FrozenStateChanged


def tensor_digest(tensors: Iterable[torch.Tensor], salt: str = "") -> str:
    """sha256 over ``salt`` and each tensor's shape, dtype and bytes, in order."""
    h = hashlib.sha256(salt.encode())
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def module_state(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter and persistent buffer of ``module`` (its ``state_dict``), in a fixed order.

    Non-persistent buffers are derived, not state: TinyViT's attention registers its bias table ``ab`` when
    put in eval mode and deletes it in train mode.
    """
    return list(module.state_dict(keep_vars=True).values())


class FrozenParts:
    """The frozen submodules of a network (dotted names, as ``models.freeze.freeze_strategy`` returns them)."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.snapshot: dict[str, str] | None = None

    def modules(self, net: nn.Module) -> list[tuple[str, nn.Module]]:
        mods = dict(net.named_modules())
        return [(n, mods[n]) for n in self.names]

    def set_training_modes(self, net: nn.Module) -> None:
        """Trainable parts in train mode, frozen parts (and everything inside them) in eval mode."""
        net.train()
        for _, m in self.modules(net):
            m.eval()

    def digests(self, net: nn.Module) -> dict[str, str]:
        return {n: tensor_digest(module_state(m)) for n, m in self.modules(net)}

    def remember(self, net: nn.Module) -> None:
        """The state the run starts from (after a checkpoint is restored)."""
        self.snapshot = self.digests(net)

    def check(self, net: nn.Module, when: str) -> None:
        """Raise ``FrozenStateChanged`` naming the first frozen part whose state differs from the snapshot."""
        if self.snapshot is None:
            return
        now = self.digests(net)
        changed = [n for n in self.names if now[n] != self.snapshot[n]]
        if changed:
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            raise FrozenStateChanged(
                f"frozen part {changed[0]!r}{more} changed its weights or buffers {when}; a frozen part must "
                "stay bit-identical (BatchNorm in train mode, or code that writes to it): the run stops so "
                "that no checkpoint or cache holds a state that was never validated.")
