"""Faults on purpose, at a chosen training batch: for the tests, and to rehearse recovery. Never in real runs.

    python -m polypsam.train +experiment=tiny +callbacks.fault._target_=polypsam.training.callbacks.InjectFault \\
        +callbacks.fault.kind=sigkill +callbacks.fault.at_batch=17
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning as L
import torch

from polypsam.errors import ConfigError
from polypsam.training.callbacks.last_checkpoint import LastCheckpoint


class InjectFault(L.Callback):
    """Makes a fault happen at a chosen training batch, to test and rehearse recovery; never in real runs.

    ``at_batch`` counts training batches over the whole run (1 = the first). Kinds: ``sigkill`` (the
    process kills itself with SIGKILL after that batch), ``pause`` (writes ``marker`` and waits up to
    ``wait_s`` seconds, until SIGTERM, or until the marker is removed, so a test can act at a known point), ``nan_grad``
    (the gradients of that batch's optimiser step become NaN), ``oom`` (raises ``torch.OutOfMemoryError``
    at the start of that batch), ``frozen_write`` (adds 1 to the first buffer, else parameter, of the first
    frozen part after that batch, as a bug that writes to a frozen part would).
    """

    KINDS = ("sigkill", "pause", "nan_grad", "oom", "frozen_write")

    def __init__(self, at_batch: int, kind: str, marker: str | None = None, wait_s: float = 120.0):
        if kind not in self.KINDS:
            raise ConfigError(f"InjectFault kind={kind!r}: choose one of {', '.join(self.KINDS)}.")
        self.at_batch, self.kind, self.marker, self.wait_s = int(at_batch), kind, marker, float(wait_s)

    @staticmethod
    def _batch_number(trainer) -> int:
        return trainer.fit_loop.epoch_loop.batch_progress.total.ready  # this batch, counted from 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.kind == "oom" and self._batch_number(trainer) == self.at_batch:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by "
                                         "polypsam.training.callbacks.InjectFault)")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.kind == "nan_grad" and self._batch_number(trainer) == self.at_batch:
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._batch_number(trainer) != self.at_batch:
            return
        if self.kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.kind == "frozen_write":
            part = dict(pl_module.net.named_modules())[pl_module.frozen_modules[0]]
            with torch.no_grad():
                next(iter([*part.buffers(), *part.parameters()])).add_(1)
        elif self.kind == "pause":
            if self.marker:
                Path(self.marker).write_text(f"{os.getpid()} {trainer.global_step}\n")
            t0 = time.monotonic()
            stopper = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
            while time.monotonic() - t0 < self.wait_s:
                if (stopper is not None and stopper.stop_requested) or trainer.received_sigterm:
                    break
                if self.marker and not Path(self.marker).exists():  # released by whoever waited for it
                    break
                time.sleep(0.05)
