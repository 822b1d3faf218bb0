"""Training that survives being killed, and says what went wrong when it cannot go on.

* ``resume=<run dir>`` / ``ckpt_path=last``: :func:`resume_argv` turns them, before Hydra starts, into the
  run's own saved config, its folder, its split and its ``checkpoints/last.ckpt``.
* :class:`ResumableOrder`: the training order is a function of (seed, epoch) and a resumed epoch skips the
  batches it already trained on, so a run killed mid-epoch ends where an uninterrupted one does.
* :class:`LastCheckpoint`: ``last.ckpt`` every N optimiser steps, and on SIGTERM (a cluster's time limit)
  at the next optimiser-step boundary before the process stops (exit status 143).
* :class:`FaultGuard`: a checkpoint with non-finite weights is never written, so ``last.ckpt`` stays good.
* :func:`describe_failure`: out-of-memory, divergence, SIGTERM and data errors as one line for the CLI.
* :class:`AtomicCheckpointIO`: checkpoints are written next to their target and renamed, so a SIGKILL
  during a save leaves the previous file intact.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from polypsam.errors import CheckpointError, ConfigError, PolypSamError

log = logging.getLogger(__name__)

LAST_NAME = "last.ckpt"
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class TrainingDiverged(PolypSamError, FloatingPointError):
    """A non-finite loss or non-finite weights: training stops, the last good checkpoint stays."""


class StoppedBySignal(SIGTERMException):
    """Raised after SIGTERM once ``last.ckpt`` is saved; a ``SystemExit`` with status 143."""

    def __init__(self, message: str):
        super().__init__(SIGTERM_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:  # SystemExit would print the status; a DDP rank's report shows this line
        return self.message


# -- checkpoint files ---------------------------------------------------------------------------------------


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the target's folder, fsync, then rename over the target.

    Lightning's own writer stages the file in the system temp folder and moves it; across file systems
    (local /tmp, network scratch) that move is a copy, and a kill during the copy truncates ``last.ckpt``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def with_atomic_checkpoints(plugins: list) -> list:
    """``plugins`` plus :class:`AtomicCheckpointIO`, unless a checkpoint writer is already among them."""
    from lightning.fabric.plugins import CheckpointIO

    plugins = list(plugins)
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def check_resume_checkpoint(path: str | Path, model_name: str | None = None) -> Path:
    """A training checkpoint that ``trainer.fit(ckpt_path=...)`` can resume from, checked before anything is
    built. Memory-mapped, so a large checkpoint is not read twice."""
    from polypsam.module import CHECKPOINT_KEY

    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; give a run's checkpoints/last.ckpt, or resume=<run dir>.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {str(exc)[:120]}); it is "
                              f"corrupt or truncated. Resume from {path.parent / 'best.ckpt'} instead "
                              f"(ckpt_path=<that file>), or start the run again.") from None
    if not isinstance(ckpt, dict) or CHECKPOINT_KEY not in ckpt or "loops" not in ckpt:
        raise CheckpointError(f"{path}: not a polypsam training checkpoint (no '{CHECKPOINT_KEY}' metadata or loop "
                              "state); resume from a run's checkpoints/last.ckpt.")
    saved = ckpt[CHECKPOINT_KEY].get("model")
    if model_name is not None and saved != model_name:
        raise CheckpointError(f"{path}: checkpoint is for model {saved!r}, but this run is model={model_name!r}; "
                              f"resume with model={saved} (or resume=<its run dir>), or start a new run.")
    return path


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | Path, model_name: str | None = None) -> str | None:
    """``ckpt_path`` as a checked file: a file as given, a run directory's ``checkpoints/last.ckpt``, or
    ``last`` for this run's own (the CLI has already turned ``last`` into a file, see :func:`resume_argv`)."""
    if ckpt_path in (None, "", "null"):
        return None
    if str(ckpt_path) == "last":
        path = Path(output_dir) / "checkpoints" / LAST_NAME
        if not path.is_file():
            raise ConfigError(f"ckpt_path=last: {path} does not exist; pass the run directory to resume: "
                              "python -m polypsam.train resume=<run dir>.")
    else:
        path = Path(ckpt_path).expanduser()
        if path.is_dir():
            path = (path if path.name == "checkpoints" else path / "checkpoints") / LAST_NAME
    return str(check_resume_checkpoint(path, model_name))


# -- the training order -------------------------------------------------------------------------------------


class EpochShuffleSampler(DistributedSampler):
    """A shuffle that depends only on (seed, epoch), split across ranks, with a one-off skip for a
    resumed epoch.

    torch's ``RandomSampler`` draws its permutation from the global RNG, whose state a checkpoint does not
    hold, so a resumed run would see another order. Each rank takes every ``num_replicas``-th index of the
    padded permutation, as torch's DistributedSampler does; being one, it is used as it is under DDP
    (Lightning would otherwise wrap it, and the wrapper cannot skip). On one process it is a plain shuffle.
    """

    def __init__(self, dataset_len: int, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(range(int(dataset_len)), num_replicas=num_replicas, rank=rank, shuffle=True,
                         seed=int(seed), drop_last=False)
        self._resume: tuple[int, int] | None = None  # (epoch, samples of this rank already trained on)

    def resume_at(self, epoch: int, rank_samples_done: int) -> None:
        self.epoch = int(epoch)
        self._resume = (int(epoch), int(rank_samples_done))

    def order(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch``: every num_replicas-th of the permutation padded to equal shares."""
        n = len(self.dataset)
        perm = np.random.default_rng([self.seed, int(epoch)]).permutation(n).tolist()
        while len(perm) < self.total_size:
            perm += perm[: self.total_size - len(perm)]
        return perm[self.rank:self.total_size:self.num_replicas]

    def __iter__(self):
        skip = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        self._resume = None
        return iter(self.order(self.epoch)[skip:])

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:  # Lightning sets the resumed epoch again: keep its pending skip
            self._resume = None
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples  # Lightning counts a resumed epoch's batches from where it stopped


class ResumableOrder(L.Callback):
    """Gives the training loader an :class:`EpochShuffleSampler` and keeps its position in checkpoints.

    The data module builds the loader; Lightning restores callback state before it asks for the loader
    and creates the first iterator, so the position loaded here is in place when the epoch resumes.
    A checkpoint saved after k batches of epoch e resumes at batch k of the same permutation.
    """

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.sampler: EpochShuffleSampler | None = None
        self._batch_size = 1
        self._trainer: L.Trainer | None = None
        self._pending: tuple[int, int] | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer
        dm = trainer.datamodule
        if stage != "fit" or dm is None or getattr(dm, "_polypsam_resumable_order", False):
            return
        original = dm.train_dataloader

        def train_dataloader():
            return self._wrap(original())

        # an instance attribute: the data module's own method stays as it is for other users
        dm.train_dataloader = train_dataloader
        dm._polypsam_resumable_order = True

    def _wrap(self, dl):
        if not isinstance(dl, DataLoader) or not isinstance(dl.sampler, RandomSampler) or dl.batch_size is None:
            log.warning("training loader has no plain shuffle; a mid-epoch resume restarts the epoch's order")
            return dl
        t = self._trainer
        self.sampler = EpochShuffleSampler(len(dl.dataset), self.seed, num_replicas=t.world_size, rank=t.global_rank)
        self._batch_size = dl.batch_size
        if self._pending is not None:
            self.sampler.resume_at(*self._pending)
            self._pending = None
        kw = dict(batch_size=dl.batch_size, sampler=self.sampler, num_workers=dl.num_workers,
                  collate_fn=dl.collate_fn, pin_memory=dl.pin_memory, drop_last=dl.drop_last, timeout=dl.timeout,
                  worker_init_fn=dl.worker_init_fn, multiprocessing_context=dl.multiprocessing_context,
                  persistent_workers=dl.persistent_workers)
        if dl.num_workers > 0:
            kw["prefetch_factor"] = dl.prefetch_factor
        return DataLoader(dl.dataset, **kw)

    def state_dict(self) -> dict[str, Any]:
        t = self._trainer
        if t is None or self.sampler is None:
            return {}
        done = t.fit_loop.epoch_loop.batch_progress.current.processed
        epoch = t.current_epoch
        if done >= t.num_training_batches:  # saved at the end of an epoch: the next one starts afresh
            epoch, done = epoch + 1, 0
        return {"seed": self.seed, "epoch": int(epoch), "rank_samples": int(done * self._batch_size),
                "world_size": int(t.world_size)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if int(state_dict.get("seed", self.seed)) != self.seed:
            log.warning("resuming with seed %s, checkpoint has %s: the data order changes", self.seed,
                        state_dict.get("seed"))
        world = self._trainer.world_size if self._trainer is not None else 1
        if int(state_dict.get("world_size", world)) != world:
            log.warning("resuming on %s processes, the checkpoint was saved on %s: the resumed epoch's order "
                        "differs from an uninterrupted run's", world, state_dict.get("world_size"))
        self._pending = (int(state_dict["epoch"]), int(state_dict.get("rank_samples", 0)))
        if self.sampler is not None:
            self.sampler.resume_at(*self._pending)
            self._pending = None


# -- last.ckpt: periodic and on SIGTERM ---------------------------------------------------------------------


class LastCheckpoint(L.Callback):
    """``<dirpath>/last.ckpt`` every ``every_n_train_steps`` optimiser steps, and once more on SIGTERM.

    Saves happen only where a resume is exact: right after an optimiser step (no half-accumulated
    gradients, which a checkpoint does not hold) and not on an epoch's last batch (its validation has
    not run yet; the end-of-epoch ``last.ckpt`` comes from ModelCheckpoint after validation). A SIGTERM
    is therefore acted on at the next such point, or after the epoch's validation, and the process then
    stops with status 143. Under DDP the ranks agree on the stop each batch, so they save together.
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


# -- non-finite values --------------------------------------------------------------------------------------


def _non_finite(tensors) -> str | None:
    for name, t in tensors:
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _optimizer_tensors(states: list) -> list:
    out = []
    for i, st in enumerate(states or []):
        for pid, s in (st.get("state") or {}).items():
            out += [(f"optimizer {i} state {pid}.{k}", v) for k, v in s.items()]
    return out


class FaultGuard(L.Callback):
    """Refuses to write a checkpoint whose weights or optimiser state are not finite, and notes the step
    at which an exception stopped training (for :func:`describe_failure`)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        bad = _non_finite(checkpoint.get("state_dict", {}).items()) or \
            _non_finite(_optimizer_tensors(checkpoint.get("optimizer_states")))
        if bad:
            where = next((Path(c.dirpath) for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)),
                         None)
            raise TrainingDiverged(
                f"non-finite values in {bad} after global step {trainer.global_step} (epoch "
                f"{trainer.current_epoch}); that checkpoint was not written, the last good one is kept"
                f"{f' in {where}' if where else ''}. Lower the learning rate (scratch.lr), clip gradients "
                "(trainer.gradient_clip_val=1.0) or train in trainer.precision=32 / bf16-mixed.")

    def on_exception(self, trainer, pl_module, exception) -> None:
        try:
            exception.polypsam_step = trainer.global_step
        except Exception:  # some exception types refuse attributes
            pass


# -- one-line messages for the command line -----------------------------------------------------------------


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, a RuntimeError saying so (older torch, other backends), or a DDP rank's
    report of one; a rank killed by a signal is not assumed to be out of memory."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if isinstance(exc, PolypSamError):
        return "OutOfMemoryError" in str(exc) or "CUDA out of memory" in str(exc)
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def oom_message(cfg, exc: BaseException, step: int | None = None) -> str:
    """Out of memory, with the settings that reduce memory and what they are now."""
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
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    advice = (f"Settings that reduce memory: {'; '.join(knobs)}." if knobs else
              "batch size 1, checkpointing, low precision and a frozen encoder are all in use already: use a "
              "smaller model (model=vit_b or lite) or a device with more memory.")
    return f"out of memory {where} on {cfg.trainer.get('accelerator', 'auto')} ({first}). {advice}"


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


@dataclass(frozen=True)
class Failure:
    line: str  # printed to stderr
    code: int  # exit status


def describe_failure(exc: BaseException, cfg) -> Failure | None:
    """The CLI's one line and exit status for a failure it knows how to explain; None: re-raise it."""
    if isinstance(exc, StoppedBySignal):
        return Failure(f"stopped: {exc.message}", SIGTERM_EXIT_CODE)
    if isinstance(exc, SIGTERMException):
        return Failure("stopped: SIGTERM before training started; nothing to resume, start the run again",
                       SIGTERM_EXIT_CODE)
    if is_out_of_memory(exc):
        return Failure(f"error: {oom_message(cfg, exc, getattr(exc, 'polypsam_step', None))}", 2)
    if isinstance(exc, (PolypSamError, FloatingPointError)):
        return Failure(f"error: {one_line(exc)}", 2)
    return None


# -- resuming from the command line -------------------------------------------------------------------------


def _quote(value: str) -> str:
    """A Hydra override value: paths with characters the override grammar treats specially are quoted."""
    if re.fullmatch(r"[\w./\-:~+@]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _split(arg: str) -> tuple[str, str | None]:
    key, sep, value = arg.partition("=")
    return (key, value) if sep else (arg, None)


def _newest_run(log_dir: Path, task: str) -> Path | None:
    found = [*log_dir.glob(f"{task}/runs/*/checkpoints/{LAST_NAME}"),
             *log_dir.glob(f"{task}/multiruns/*/*/checkpoints/{LAST_NAME}")]
    return max(found, key=lambda p: p.stat().st_mtime).parent.parent if found else None


def find_last_run(overrides: list[str]) -> Path:
    """The newest run of this command's task (``task_name``) under ``paths.log_dir`` with a ``last.ckpt``."""
    from hydra import compose, initialize_config_dir

    from polypsam.config import CONF_DIR

    for a in overrides:
        key, value = _split(a)
        if key == "hydra.run.dir" and value and (Path(value) / "checkpoints" / LAST_NAME).is_file():
            return Path(value)
    # deletions (~key) only matter to the resumed job; they may name keys this composition lacks
    plain = [a for a in overrides if not a.startswith(("-", "~")) and not _split(a)[0].lstrip("+").startswith("hydra.")]
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="train"):
            cfg = compose("train", overrides=plain)
        task, log_dir = str(cfg.task_name), Path(str(cfg.paths.log_dir))
    except Exception as exc:  # Hydra's errors for a bad override
        raise ConfigError(f"ckpt_path=last: cannot compose the config to find the run ({one_line(exc)}); "
                          "pass the run directory instead: resume=<run dir>.") from None
    run = _newest_run(log_dir, task)
    if run is None:
        raise ConfigError(f"ckpt_path=last: no run of task {task!r} under {log_dir / task} has "
                          f"checkpoints/{LAST_NAME}; pass the run directory instead: resume=<run dir>.")
    return run


def check_run_dir(run: Path) -> Path:
    run = run.expanduser().resolve()
    if run.name == "checkpoints":
        run = run.parent
    if not run.is_dir():
        raise ConfigError(f"{run}: run directory not found; give the folder a training run wrote "
                          "(it holds .hydra/config.yaml and checkpoints/last.ckpt).")
    if not (run / ".hydra" / "config.yaml").is_file():
        raise ConfigError(f"{run}: not a polypsam run directory (no .hydra/config.yaml); give the folder a "
                          "training run wrote, or ckpt_path=<a .ckpt file> to start a new run from it.")
    if not (run / "checkpoints" / LAST_NAME).is_file():
        raise CheckpointError(f"{run / 'checkpoints' / LAST_NAME}: not found; the run stopped before its first "
                              "checkpoint, so there is nothing to resume: start it again.")
    return run


def resume_argv(argv: list[str]) -> list[str]:
    """Command-line arguments for resuming, or ``argv`` unchanged when nothing is resumed.

    ``resume=<run dir>``, ``ckpt_path=<run dir>`` and ``ckpt_path=last`` become: the run's saved
    ``.hydra/config.yaml`` as the whole config (``--config-dir``; the ``conf/`` files may have changed
    since), ``hydra.run.dir=<run dir>`` so Hydra writes into the same folder instead of a new one,
    ``ckpt_path=<run>/checkpoints/last.ckpt`` and ``data.split_file=<run>/split.json``. Overrides the run
    was started with are dropped (they are in its config); other value overrides are kept
    (``~callbacks.x``, ``trainer.max_epochs=...``); config-group choices are refused.
    """
    from polypsam.config import CONF_DIR

    target, rest = None, []
    for a in argv[1:]:
        key, value = _split(a)
        name = key.lstrip("+")
        if value is not None and name == "resume":
            target = value
        elif value is not None and name == "ckpt_path" and (value == "last" or Path(value).expanduser().is_dir()):
            target = value
        else:
            rest.append(a)
    if target is None:
        return argv
    if any(a in ("-m", "--multirun") or a.startswith(("--config-name", "-cn", "--config-dir", "-cd",
                                                       "--config-path", "-cp")) for a in rest):
        raise ConfigError("resume= / ckpt_path=last cannot be combined with --multirun or another config; "
                          "resume one run at a time.")
    run = check_run_dir(find_last_run(rest) if target == "last" else Path(target))
    hydra_dir = run / ".hydra"
    original = hydra_dir / "original_overrides.yaml"
    if not original.is_file() and (hydra_dir / "overrides.yaml").is_file():
        # Hydra rewrites overrides.yaml for the resumed job; keep what the run was started with
        original.write_text((hydra_dir / "overrides.yaml").read_text())
    import yaml

    started_with = set()
    for f in (original, hydra_dir / "overrides.yaml"):
        if f.is_file():
            started_with.update(str(x) for x in (yaml.safe_load(f.read_text()) or []))
    own = ("hydra.run.dir", "ckpt_path", "data.split_file", "resume")
    extras = [a for a in rest if a not in started_with and _split(a)[0].lstrip("+~") not in own]
    groups = {p.name for p in Path(CONF_DIR).iterdir() if p.is_dir()}
    refused = [a for a in extras if not a.startswith("-") and "." not in _split(a)[0]
               and _split(a)[0].lstrip("+~").split("/")[0] in groups]
    if refused:
        raise ConfigError(f"resume={run}: {', '.join(refused)} would change config groups of the run being "
                          f"resumed; a resumed run keeps the config it started with ({hydra_dir / 'config.yaml'}). "
                          "Drop them, or start a new run.")
    new = [argv[0], f"--config-dir={hydra_dir}", "--config-name=config", f"hydra.run.dir={_quote(str(run))}",
           f"ckpt_path={_quote(str(run / 'checkpoints' / LAST_NAME))}"]
    if (run / "split.json").is_file():
        new.append(f"data.split_file={_quote(str(run / 'split.json'))}")
    print(f"resuming {run} from {run / 'checkpoints' / LAST_NAME}", flush=True)
    return new + extras


# -- faults on purpose (tests and drills) -------------------------------------------------------------------


class InjectFault(L.Callback):
    """Makes a fault happen at a chosen training batch, to test and rehearse recovery; never in real runs.

    ``at_batch`` counts training batches over the whole run (1 = the first). Kinds: ``sigkill`` (the
    process kills itself with SIGKILL after that batch), ``pause`` (writes ``marker`` and waits up to
    ``wait_s`` seconds, or until SIGTERM, so a test can signal it at a known point), ``nan_grad``
    (the gradients of that batch's optimiser step become NaN), ``oom`` (raises ``torch.OutOfMemoryError``
    at the start of that batch).
    """

    KINDS = ("sigkill", "pause", "nan_grad", "oom")

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
                                         "polypsam.faults.InjectFault)")

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
        elif self.kind == "pause":
            if self.marker:
                Path(self.marker).write_text(f"{os.getpid()} {trainer.global_step}\n")
            t0 = time.monotonic()
            stopper = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
            while time.monotonic() - t0 < self.wait_s:
                if (stopper is not None and stopper._requested) or trainer.received_sigterm:
                    break
                time.sleep(0.05)
