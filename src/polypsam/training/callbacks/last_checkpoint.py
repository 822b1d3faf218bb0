"""``last.ckpt`` every N optimiser steps, and once more on SIGTERM (a cluster's time limit) before stopping."""

from __future__ import annotations

import signal
from pathlib import Path

import lightning as L

from polypsam.errors import ConfigError, StoppedBySignal
from polypsam.training.checkpoints import LAST_NAME


class LastCheckpoint(L.Callback):
    """``<dirpath>/last.ckpt`` every ``every_n_train_steps`` optimiser steps, and once more on SIGTERM.

    Saves happen only where a resume is exact: right after an optimiser step (no half-accumulated
    gradients, which a checkpoint does not hold) and not on an epoch's last batch (its validation has
    not run yet; the end-of-epoch ``last.ckpt`` comes from ModelCheckpoint after validation). A SIGTERM
    is therefore acted on at the next such point, or after the epoch's validation, and the process then
    stops with status 143 (:class:`~polypsam.errors.StoppedBySignal`). Under DDP the ranks agree on the
    stop each batch, so they save together.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int | None = None, on_sigterm: bool = True,
                 filename: str = LAST_NAME):
        if every_n_train_steps is not None and int(every_n_train_steps) < 1:
            raise ConfigError(f"callbacks.last_checkpoint.every_n_train_steps={every_n_train_steps}: use a "
                              "positive number of optimiser steps, or null for end-of-epoch checkpoints only.")
        self.path = Path(dirpath) / filename
        self.every = int(every_n_train_steps) if every_n_train_steps else None
        self.on_sigterm = on_sigterm
        self._requested = False
        self._previous_handler = None
        self._last_saved_step = -1

    @property
    def stop_requested(self) -> bool:
        """SIGTERM has arrived in this process; the stop happens at the next point where a resume is exact."""
        return self._requested

    # signal handling: Lightning's own handler raises at the end of whichever batch the signal lands in,
    # mid-accumulation or before validation; this one only records the request.
    def _handler(self, signum, frame) -> None:
        self._requested = True

    def on_train_start(self, trainer, pl_module) -> None:
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):  # left by a kill during a save
            stale.unlink(missing_ok=True)
        if self.on_sigterm:
            try:
                self._previous_handler = signal.signal(signal.SIGTERM, self._handler)
            except ValueError:  # not the main thread: leave signals to Lightning
                self._previous_handler = None

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handler()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_handler()

    def _stop_requested(self, trainer) -> bool:
        if not self.on_sigterm:
            return False
        if trainer.world_size > 1:  # every rank must take the same decision at the same batch
            return bool(trainer.strategy.reduce_boolean_decision(self._requested, all=False))
        return self._requested

    def _save(self, trainer) -> None:
        trainer.save_checkpoint(str(self.path))
        self._last_saved_step = trainer.global_step

    def _stop(self, trainer) -> None:
        self._save(trainer)
        run = self.path.parent.parent if self.path.parent.name == "checkpoints" else self.path.parent
        raise StoppedBySignal(f"SIGTERM at global step {trainer.global_step} (epoch "
                              f"{trainer.current_epoch}); saved {self.path}; resume with: "
                              f"python -m polypsam.train resume={run}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loop = trainer.fit_loop.epoch_loop
        stepped = not loop._should_accumulate()
        last_batch = loop.batch_progress.is_last_batch or \
            loop.batch_progress.current.processed >= trainer.num_training_batches
        if self._stop_requested(trainer):
            if stepped and not last_batch:
                self._stop(trainer)
            return  # at the next optimiser step, or after this epoch's validation
        step = trainer.global_step
        if self.every and stepped and not last_batch and step % self.every == 0 and step != self._last_saved_step:
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._stop_requested(trainer):
            self._stop(trainer)
