"""``python -m <module> ...`` in a real process forked from a warm interpreter, for the command-line tests.

A fresh interpreter spends about 5 s of this 2-core CPU importing Lightning, which imports torchmetrics and
through it torchvision, transformers and scipy; the suite starts some sixty command lines. multiprocessing's
forkserver imports those once per pytest worker (``PRELOAD``) and forks each command from there: a process of
its own, with its own pid, environment, working folder, output and exit status (``-N`` for signal N), that runs
the module as ``__main__`` as ``python -m`` does. What it cannot show is what a command imports, or prints
while importing: tests of those start a fresh interpreter (``tests/test_config_checks.py``).
"""

from __future__ import annotations

import atexit
import io
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch

# what every command imports anyway; nothing of polypsam's command modules themselves (runpy runs those afresh)
PRELOAD = ["lightning.pytorch", "torchmetrics", "polypsam.run_parts", "polypsam.evaluation", "polypsam.training.launch"]
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(PRELOAD)


def _command(module: str, argv: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    """The forked process: the environment, folder, output files and argv of ``python -m module``, then exit."""
    os.environ.clear()
    os.environ.update(env)
    if env.get("OMP_NUM_THREADS"):  # OpenMP read it when the warm interpreter imported torch; a fresh one reads this
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False))
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
    sys.argv = [module, *argv]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:  # as the interpreter reads it: None 0, an int itself, anything else printed, 1
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 (an uncaught exception: its traceback and status 1, as python -m)
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # the interpreter's exit; multiprocessing's own would skip them
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(module: str, *args, env: dict, cwd: Path | str, timeout: float) -> subprocess.CompletedProcess:
    """As ``subprocess.run([python, "-m", module, *args], env=env, cwd=cwd, capture_output=True, text=True)``."""
    argv = [str(a) for a in args]
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = _CONTEXT.Process(target=_command, args=(module, argv, dict(env), str(cwd), out, err))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired([sys.executable, "-m", module, *argv], timeout)
        return subprocess.CompletedProcess([sys.executable, "-m", module, *argv], proc.exitcode,
                                           Path(out).read_text(errors="replace"), Path(err).read_text(errors="replace"))
