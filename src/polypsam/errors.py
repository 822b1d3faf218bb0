"""Errors a user can act on: each names the file at fault and the fix.

Import-light on purpose (any module may import it, the torch-free commands prepare and weights too): the
standard library only. How the command line reports each of these is in :mod:`polypsam.cli`.
"""

import signal

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM  # 143: what a shell reports for a process ended by SIGTERM


class PolypSamError(Exception):
    """Base class: printed as a single line by the command-line entry points."""


class DataError(PolypSamError, ValueError):
    """A data file or folder that cannot be used as it is."""


class CheckpointError(PolypSamError, FileNotFoundError):
    """A model or training checkpoint that is missing, corrupt or of another kind."""


class ConfigError(PolypSamError, ValueError):
    """A combination of settings that cannot work together."""


class RunDirInUse(PolypSamError, RuntimeError):
    """A run folder that another live process is writing a run into (``polypsam.run_dir``)."""


class TrainingDiverged(PolypSamError, FloatingPointError):
    """A non-finite loss or non-finite weights: training stops, the last good checkpoint stays."""


class StoppedBySignal(SystemExit):
    """Raised after SIGTERM once ``last.ckpt`` is saved; a ``SystemExit`` with status 143.

    Like Lightning's ``SIGTERMException`` (which Lightning only raises, never catches) it is a SystemExit,
    but not a subclass of it: importing that one class runs ``lightning/__init__`` (Trainer and torch,
    several seconds), which this module must not cost.
    """

    def __init__(self, message: str):
        super().__init__(SIGTERM_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:  # SystemExit would print the status; a DDP rank's report shows this line
        return self.message


class FrozenStateChanged(PolypSamError, RuntimeError):
    """A part the strategy froze differs from the model as built (e.g. BatchNorm statistics): changed during a
    run, or so in the checkpoint a run resumes from."""
