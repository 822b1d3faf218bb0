"""A run's folder: its default name, and the claim that keeps a second process out of it.

Default folders are named ``<date>_<time>_<pid>`` (:func:`run_stamp`, the ``${run_stamp:}`` resolver of
``conf/hydra/default.yaml``): two runs started in the same second get two folders. A folder given by name
(``hydra.run.dir=``, ``resume=``, a sweep's fixed job folder) may still be asked for twice; whoever writes a
run into it holds an OS lock on its ``.run.lock`` (:func:`claim_run_dir`) for the run's life, and a second
process stops with one line naming the holder. The OS drops the lock when the holder ends, however it
ends, so a killed run can be resumed at once.

Who holds it: :class:`ClaimRunDir` (a Hydra callback) from before Hydra writes ``.hydra/`` into the folder;
``train`` on global rank 0; the process that spawns DDP ranks (``polypsam.training.launch``). A claim nested in the
same process is the outer one's, and a spawned rank takes its parent's claim as its own. Forked children
(DataLoader workers) close their copy of the lock, so it never outlives the process that took it.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import TextIO

from hydra.experimental.callback import Callback

from polypsam.cli import run_cli
from polypsam.errors import RunDirInUse

log = logging.getLogger(__name__)

LAST_NAME = "last.ckpt"  # a run's resumable checkpoint, in <run>/checkpoints/
LOCK_NAME = ".run.lock"  # the holder's pid, host, command and start time (JSON), for the refusal's line

_compositions = itertools.count(1)
_held: dict[Path, TextIO] = {}  # run folders this process holds, by resolved path


def run_stamp() -> str:
    """A run folder's name: the time to the second and this process's id; from the second composition in one
    process on, ``-<n>`` as well. Registered with ``use_cache``: one value per composed config."""
    n = next(_compositions)
    return f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{os.getpid()}" + (f"-{n}" if n > 1 else "")


def _close_in_child() -> None:
    for f in _held.values():
        f.close()  # only this process's copy: the parent's lock stays
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


def _holder(lock: Path) -> dict:
    try:
        info = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # written a moment after the lock is taken
        return {}
    return info if isinstance(info, dict) else {}


def _in_use(folder: Path, holder: dict) -> RunDirInUse:
    who = (f"pid {holder['pid']} on {holder.get('host', '?')} since {holder.get('started', '?')} "
           f"({holder.get('command', '?')})" if "pid" in holder else "another process")
    return RunDirInUse(f"{folder}: this run folder is in use by {who}; wait for that run to end or stop it "
                       "(SIGTERM saves last.ckpt), or give this run another folder.")


def _lock(folder: Path) -> TextIO | None:
    """The open, locked ``.run.lock`` of ``folder``; None when the claim is not this process's to take (its
    parent holds the folder, or the file system has no locks)."""
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / LOCK_NAME, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        holder = _holder(folder / LOCK_NAME)
        if holder.get("pid") == os.getppid() and holder.get("host") == socket.gethostname():
            return None  # a DDP rank spawned by the process that holds the run
        raise _in_use(folder, holder) from None
    except OSError as exc:  # some network file systems have no locks
        f.close()
        log.warning("%s: cannot lock the run folder (%s); nothing keeps a second run out of it", folder,
                    exc.strerror)
        return None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "started": datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}))
    f.flush()
    return f


@contextmanager
def claim_run_dir(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder`` (created if missing) for the ``with`` block; :class:`~polypsam.errors.RunDirInUse`
    when another live process holds it."""
    folder = Path(folder).expanduser().resolve()
    f = None if folder in _held else _lock(folder)
    if f is not None:
        _held[folder] = f
    try:
        yield folder
    finally:
        if f is not None:
            _held.pop(folder, None)
            f.close()  # closing drops the lock


# Lightning's own reading of the rank (lightning.fabric.utilities.rank_zero._get_rank), repeated here because
# importing it imports all of Lightning (torchmetrics, torchvision, transformers: seconds), and this runs before
# a command's config is checked; tests/test_run_dir.py compares the two for every variable.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def environment_rank() -> int:
    """This process's global rank as Lightning reads it from the environment (srun, torchrun), else 0."""
    return next((int(os.environ[k]) for k in RANK_VARIABLES if os.environ.get(k) is not None), 0)


class ClaimRunDir(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/hydra/default.yaml): claims ``hydra.run.dir`` before Hydra
    writes ``.hydra/`` into it, until the run ends. A refusal is the command line's one line, status 2.
    Ranks other than 0 of a world started by srun or torchrun (Lightning's rank from the environment) share
    rank 0's folder and claim nothing."""

    def __init__(self) -> None:
        self._claim = ExitStack()

    def on_run_start(self, config, **kwargs) -> None:
        if environment_rank() == 0:
            run_cli(self._claim.enter_context, claim_run_dir(config.hydra.run.dir))

    def on_run_end(self, config, **kwargs) -> None:
        self._claim.close()
