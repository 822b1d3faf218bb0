"""The command line's failure policy: one line on stderr and one exit status per kind of failure, no traceback.

Each entry point runs its command through :func:`run_cli` (train and compare do; evaluate, predict,
prepare and weights are to). Import-light: the standard library and :mod:`polypsam.errors` only, so a
torch-free command stays torch-free::

    run_cli(fn, *args, cfg=None, on_oom=None, return_code=False) -> fn(*args)

    # a Hydra entry point                          # an argparse one
    @hydra.main(...)                               def main(argv=None) -> int:
    def _hydra_main(cfg):                              args = parser.parse_args(argv)
        return run_cli(evaluate, cfg, cfg=cfg)         return run_cli(_run, args, return_code=True)

* ``fn(*args)`` is the command; its result is returned as it is (keyword arguments: ``functools.partial``).
* ``cfg``: the command's composed Hydra config. With a training config (``data.batch_size``, ``trainer``)
  an out-of-memory line names the settings that reduce memory and their values (:func:`oom_message`).
* ``on_oom(exc) -> str``: the out-of-memory line (after ``error: ``) for other commands, e.g.
  ``lambda exc: f"out of memory on {cfg.device} ({one_line(exc)[:160]}); lower batch_size (now 8)"``.
* ``return_code=True``: return the failure's exit status instead of raising ``SystemExit`` with it, for a
  ``main(argv) -> int`` that the script ends with ``sys.exit(main())``.

Exit statuses (:func:`describe_failure` maps an exception to its line and status):

=====================  ====  ========================================================================
``EXIT_ERROR``            2  ``error: ...``: a :class:`~polypsam.errors.PolypSamError` (data, config,
                             checkpoint, a run folder in use, a failed DDP rank), divergence (``FloatingPointError``, e.g.
                             :class:`~polypsam.errors.TrainingDiverged`) or out of memory
``EXIT_INTERRUPTED``    130  ``stopped: interrupted (Ctrl-C)``: ``KeyboardInterrupt``
``EXIT_SIGTERM``        143  ``stopped: ...``: SIGTERM; :class:`~polypsam.errors.StoppedBySignal` after
                             ``last.ckpt`` was saved (the line says how to resume), or before training
=====================  ====  ========================================================================

A ``SystemExit`` of the command's own (argparse, ``sys.exit``) passes through; any other exception is a bug
and is re-raised with its traceback.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from polypsam.errors import SIGTERM_EXIT_CODE, PolypSamError, StoppedBySignal

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_SIGTERM = SIGTERM_EXIT_CODE  # 143

T = TypeVar("T")


# -- one-line messages --------------------------------------------------------------------------------------

def _loaded_class(module: str, name: str) -> type | None:
    """``module.name`` if that module is imported already, else None.

    An exception of a class can only exist once its module is imported, so the check needs no import: this
    module stays as light as :mod:`polypsam.errors`, for the commands that never load torch or Lightning.
    """
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


def _is_sigterm(exc: BaseException) -> bool:
    """Lightning's ``SIGTERMException``: SIGTERM arrived before :class:`StoppedBySignal` could be raised."""
    cls = _loaded_class("lightning.pytorch.utilities.exceptions", "SIGTERMException")
    return cls is not None and isinstance(exc, cls)


_WRAPPED = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.*)$")


def one_line(exc: BaseException | str) -> str:
    """An exception's message on one line; a DataLoader worker's wrapped traceback is reduced to its
    original message (``Caught DataError in DataLoader worker process 0. Original Traceback ...``)."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1].strip()
        m = _WRAPPED.match(last)
        text = m.group(2) if m else last
    return " ".join(text.split())


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, a RuntimeError saying so (older torch, other backends), or a DDP rank's
    report of one; a rank killed by a signal is not assumed to be out of memory."""
    torch_oom = _loaded_class("torch", "OutOfMemoryError")
    if torch_oom is not None and isinstance(exc, torch_oom):
        return True
    if isinstance(exc, PolypSamError):
        return "OutOfMemoryError" in str(exc) or "CUDA out of memory" in str(exc)
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__


def oom_message(cfg, exc: BaseException, step: int | None = None) -> str:
    """Out of memory in training, with the settings that reduce memory and what they are now."""
    bs = int(cfg.data.batch_size)
    eff = cfg.data.get("effective_batch_size")
    precision = str(cfg.trainer.get("precision", "32"))
    knobs = []
    if bs > 1:
        knobs.append(f"data.batch_size={bs // 2} (now {bs}; gradient accumulation keeps the effective batch"
                     f"{f' of {eff}' if eff else ''})")
    if not cfg.model.get("gradient_checkpointing", False):
        knobs.append("model.gradient_checkpointing=true (recompute encoder activations in the backward pass)")
    if precision in ("32", "32-true", "64", "64-true"):
        knobs.append("trainer.precision=bf16-mixed (A100/H100) or 16-mixed (V100)")
    if cfg.get("strategy") is not None and cfg.strategy.get("name") != "dec":
        knobs.append("strategy=dec (frozen encoder: no encoder gradients or optimiser state)")
    where = f"at global step {step}" if step is not None else "while starting"
    advice = (f"Settings that reduce memory: {'; '.join(knobs)}." if knobs else
              "batch size 1, checkpointing, low precision and a frozen encoder are all in use already: use a "
              "smaller model (model=vit_b or lite) or a device with more memory.")
    return f"out of memory {where} on {cfg.trainer.get('accelerator', 'auto')} ({_first_line(exc)}). {advice}"


def _is_training_config(cfg) -> bool:
    try:
        return cfg.get("trainer") is not None and cfg.get("data") is not None and \
            cfg.data.get("batch_size") is not None
    except AttributeError:  # not a config mapping
        return False


# -- the policy ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    line: str  # printed to stderr
    code: int  # exit status


def describe_failure(exc: BaseException, cfg=None, on_oom: Callable[[BaseException], str] | None = None
                     ) -> Failure | None:
    """The CLI's one line and exit status for a failure it knows how to explain; None: re-raise it."""
    if isinstance(exc, StoppedBySignal):
        return Failure(f"stopped: {exc.message}", EXIT_SIGTERM)
    if _is_sigterm(exc):
        return Failure("stopped: SIGTERM before training started; nothing to resume, start the run again",
                       EXIT_SIGTERM)
    if isinstance(exc, KeyboardInterrupt):
        return Failure("stopped: interrupted (Ctrl-C)", EXIT_INTERRUPTED)
    if is_out_of_memory(exc):
        if on_oom is not None:
            return Failure(f"error: {on_oom(exc)}", EXIT_ERROR)
        if _is_training_config(cfg):
            return Failure(f"error: {oom_message(cfg, exc, getattr(exc, 'polypsam_step', None))}", EXIT_ERROR)
        return Failure(f"error: out of memory ({_first_line(exc)}); use a smaller batch or a device with more "
                       "memory.", EXIT_ERROR)
    if isinstance(exc, (PolypSamError, FloatingPointError)):
        return Failure(f"error: {one_line(exc)}", EXIT_ERROR)
    return None


def run_cli(fn: Callable[..., T], *args: Any, cfg=None, on_oom: Callable[[BaseException], str] | None = None,
            return_code: bool = False) -> T | int:
    """``fn(*args)``; a failure :func:`describe_failure` knows becomes one line on stderr and its exit status
    (``SystemExit``, or returned with ``return_code=True``). See the module's docstring for the statuses."""
    try:
        return fn(*args)
    except BaseException as exc:  # data errors, divergence, out of memory, SIGTERM: one line, no traceback
        if type(exc) is SystemExit:
            # the command's own exit (argparse, sys.exit): its status as it is
            raise
        failure = describe_failure(exc, cfg, on_oom)
        if failure is None:
            raise
        print(failure.line, file=sys.stderr, flush=True)
        if return_code:
            return failure.code
        raise SystemExit(failure.code) from None
