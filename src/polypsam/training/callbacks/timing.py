"""Wall time of each training epoch."""

from __future__ import annotations

import time

import lightning as L
import torch


class EpochTimer(L.Callback):
    """Wall time of each epoch (training and its validation), logged as ``time/epoch_s`` and kept in
    ``durations`` (``results.json``'s ``epoch_seconds``)."""

    def __init__(self):
        self.durations: list[float] = []
        self._t0 = 0.0

    def on_train_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()  # a resumed run restarts mid-epoch without on_train_epoch_start

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        dt = time.perf_counter() - self._t0
        self.durations.append(dt)
        pl_module.log("time/epoch_s", torch.tensor(dt), on_epoch=True, sync_dist=False, rank_zero_only=True)
