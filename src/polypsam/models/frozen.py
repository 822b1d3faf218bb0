"""Frozen parts stay frozen: eval mode whenever they run, and their weights and buffers bit-identical.

A frozen part has ``requires_grad=False`` parameters, but that alone does not freeze it: BatchNorm in
train mode normalises with batch statistics and moves its running statistics even under ``no_grad``,
and dropout stays active. Lightning 2.6 never calls ``LightningModule.train()`` during ``fit`` (its loops
save and restore each submodule's own flag around validation), so the modes are set in a hook Lightning
does call, before every training batch (``PolypSAMModule.on_train_batch_start``).

Their state is checked against the network as it was built (the pretrained weights, or the base weights
LoRA adapts), never against a restored checkpoint: before fit trains, so that a resumed checkpoint whose
frozen parts moved is refused, at every checkpoint and at the end of fit.
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
    """The frozen parts of a network: its frozen submodules (dotted names, as ``freeze_strategy`` returns
    them) and each parameter without a gradient outside them (under LoRA: peft's base weights in the
    adapted layers, position embeddings, attention biases), that is, all that a LoRA checkpoint leaves out
    (``models.identity.trainable_state``). Made from the freshly built network: its digests, one per
    tensor, are the reference of every check.
    """

    def __init__(self, net: nn.Module, names: Sequence[str], norm_eval: Sequence[str] = ()):
        self.names = list(names)
        self.norm_eval = list(norm_eval)  # trainable BatchNorms held in eval mode (strategy.norm_eval)
        holder: dict[int, str] = {}  # id of a frozen tensor -> the frozen part holding it (the first listed)
        for name, m in reversed(self.modules(net)):
            holder |= {id(t): name for t in module_state(m)}
        mods = dict(net.named_modules())
        for name in self.norm_eval:  # their running statistics are frozen state; weight and bias train
            for t in mods[name].buffers():
                holder.setdefault(id(t), name)
        for name, p in net.named_parameters():
            if not p.requires_grad:
                holder.setdefault(id(p), name)
        state = net.state_dict(keep_vars=True)
        self.part = {key: holder[id(t)] for key, t in state.items() if id(t) in holder}  # tensor name -> part
        self.reference = self.digests(net)

    def modules(self, net: nn.Module) -> list[tuple[str, nn.Module]]:
        mods = dict(net.named_modules())
        return [(n, mods[n]) for n in self.names]

    def set_training_modes(self, net: nn.Module) -> None:
        """Trainable parts in train mode, frozen parts (and everything inside them) and the ``norm_eval``
        BatchNorms in eval mode."""
        net.train()
        mods = dict(net.named_modules())
        for name in (*self.names, *self.norm_eval):
            mods[name].eval()

    def digests(self, net: nn.Module) -> dict[str, str]:
        """The digest of each frozen tensor, by its name in ``net.state_dict()``."""
        state = net.state_dict(keep_vars=True)
        return {key: tensor_digest([state[key]]) for key in self.part}

    def changed(self, net: nn.Module) -> list[str]:
        """The frozen tensors whose state differs from the network as built, in order."""
        now = self.digests(net)
        return [key for key, digest in self.reference.items() if now[key] != digest]

    def _named(self, changed: list[str]) -> str:
        parts = list(dict.fromkeys(self.part[key] for key in changed))
        more = f" (and {len(parts) - 1} more)" if len(parts) > 1 else ""
        return f"frozen part {parts[0]!r}{more}"

    def check(self, net: nn.Module, when: str) -> None:
        """Raise ``FrozenStateChanged`` naming the first frozen part that differs from the built network."""
        changed = self.changed(net)
        if changed:
            raise FrozenStateChanged(
                f"{self._named(changed)} changed its weights or buffers {when} ({changed[0]}); a frozen "
                "part must stay bit-identical (BatchNorm in train mode, or code that writes to it): the run "
                "stops so that no checkpoint or cache holds a state that was never validated.")

    def check_resumed(self, net: nn.Module, checkpoint: str) -> None:
        """After ``checkpoint`` was restored: its frozen parts must be those of the network as built."""
        changed = self.changed(net)
        if changed:
            raise FrozenStateChanged(
                f"{checkpoint}: {self._named(changed)} differs from the weights this run was built with "
                f"({changed[0]}): the checkpoint was written with other pretrained weights, or edited, or "
                "by a run whose frozen parts drifted (its best checkpoint is then not the model its "
                "validation scored). Resume with the weights the run started from (model, "
                "model.checkpoint_dir), or start a new run from the pretrained weights.")


def trainable_batchnorms(net: nn.Module) -> list[str]:
    """The BatchNorm modules of ``net`` whose weight or bias trains (``strategy.norm_eval`` holds them in eval
    mode: normalising with, and keeping, their pretrained running statistics; mmseg's ``norm_eval``)."""
    return [name for name, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and any(p.requires_grad for p in m.parameters(recurse=False))]
