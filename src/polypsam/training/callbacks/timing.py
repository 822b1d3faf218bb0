"""Wall time of each training epoch, and of a fit across the sessions that resumed it."""

from __future__ import annotations

import time

import lightning as L
import torch

from polypsam.reporting.provenance import hardware


class EpochTimer(L.Callback):
    """Wall time of each epoch (training and its validation), logged as ``time/epoch_s`` and kept in
    ``durations`` (``results.json``'s ``epoch_seconds``), and the fit's wall time per session.

    Both travel in the checkpoint (``state_dict``), so a run trained over several sessions, each resuming
    ``last.ckpt``, reports its whole cost: ``sessions()`` lists each session's CPU and seconds up to its last
    checkpoint (what a killed session did after that is redone, and counted, by the next one).
    ``complete`` is False for a run resumed from a checkpoint that predates this record: only the sessions
    since then are known.
    """

    def __init__(self):
        self.durations: list[float] = []
        self.earlier: list[dict] = []  # the sessions before this one, restored from the checkpoint
        self.complete = True
        self._restored = False
        self._t0 = self._start = 0.0
        self._cpu = ""

    def on_fit_start(self, trainer, pl_module):
        self._start, self._cpu = time.perf_counter(), hardware()["cpu"]
        self.complete = trainer.ckpt_path is None or self._restored

    def on_train_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()  # a resumed run restarts mid-epoch without on_train_epoch_start

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        dt = time.perf_counter() - self._t0
        self.durations.append(dt)
        pl_module.log("time/epoch_s", torch.tensor(dt), on_epoch=True, sync_dist=False, rank_zero_only=True)

    def sessions(self) -> list[dict]:
        """Every session's ``{"cpu", "seconds"}``, this one's up to now."""
        return [*self.earlier, {"cpu": self._cpu, "seconds": time.perf_counter() - self._start}]

    def state_dict(self) -> dict:
        return {"durations": list(self.durations), "sessions": self.sessions()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.durations = list(state_dict.get("durations", []))
        self.earlier = list(state_dict.get("sessions", []))
        self._restored = True
