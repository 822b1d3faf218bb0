"""Lightning callbacks, one per file; configs name them as ``polypsam.training.callbacks.<Class>``.

* :class:`ValidationOverlays` (``overlays.py``): a few validation images per epoch, as PNG and in W&B.
* :class:`EpochTimer` (``timing.py``): wall time of each epoch.
* :class:`LastCheckpoint` (``last_checkpoint.py``): ``last.ckpt`` every N optimiser steps and on SIGTERM.
* :class:`FaultGuard` (``fault_guard.py``): a checkpoint with non-finite weights is never written.
* :class:`InjectFault` (``drills.py``): a fault at a chosen batch, for tests and recovery drills.
"""

from polypsam.training.callbacks.drills import InjectFault
from polypsam.training.callbacks.fault_guard import FaultGuard
from polypsam.training.callbacks.last_checkpoint import LastCheckpoint
from polypsam.training.callbacks.overlays import ValidationOverlays
from polypsam.training.callbacks.timing import EpochTimer

__all__ = ["EpochTimer", "FaultGuard", "InjectFault", "LastCheckpoint", "ValidationOverlays"]
