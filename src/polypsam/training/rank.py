"""One DDP rank: its own log file (``ddp/rank<k>.log``), its report (:class:`RankReport`, ``ddp/rank<k>.json``),
the record of its failure for the parent (``ddp/error_rank<k>.json``), its process group torn down."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

import lightning as L
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, open_dict

from polypsam.cli import describe_failure, one_line
from polypsam.errors import StoppedBySignal

log = logging.getLogger("polypsam.training.launch")

# -- one rank ---------------------------------------------------------------------------------------------


_RANK_LOGGERS = ("", "lightning.pytorch", "lightning.fabric")


def _rank_logging(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s [%(name)s] %(levelname)s %(message)s"))
    # Lightning's loggers do not propagate to the root logger when it had no handler at import time
    for name in _RANK_LOGGERS:
        lg = logging.getLogger(name)
        lg.addHandler(handler)
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)
    return handler


def run_rank(fn, cfg: DictConfig, rank: int, world: int, env: str) -> dict:
    """``fn(cfg)`` as global rank ``rank``: own log file, rank report, process group torn down at the end."""
    rank_zero_only.rank = rank  # train() writes rank-0 files before Lightning would set this
    ddp_dir = Path(cfg.paths.output_dir) / "ddp"
    ddp_dir.mkdir(parents=True, exist_ok=True)
    handler = _rank_logging(ddp_dir / f"rank{rank}.log")
    with open_dict(cfg):
        if cfg.get("callbacks") is None:
            cfg.callbacks = {}
        cfg.callbacks.rank_report = {"_target_": "polypsam.training.rank.RankReport", "dirpath": str(ddp_dir)}
    log.info("rank %d of %d (%s): pid %d on %s, master %s:%s", rank, world, env, os.getpid(),
             socket.gethostname(), os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"))
    t0 = time.perf_counter()
    try:
        results = fn(cfg)
    except BaseException as exc:
        log.exception("rank %d failed", rank)
        (ddp_dir / f"error_rank{rank}.json").write_text(json.dumps(_error_record(exc, cfg)))
        raise
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
            log.info("rank %d: process group destroyed", rank)
        log.info("rank %d finished after %.1f s", rank, time.perf_counter() - t0)
        for name in _RANK_LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        handler.close()
    return results


def _error_record(exc: BaseException, cfg: DictConfig) -> dict:
    """What the parent needs to report a rank's failure as the CLI would without DDP."""
    rec = {"type": type(exc).__name__, "message": one_line(exc) or repr(exc)}
    if isinstance(exc, StoppedBySignal):
        rec["stopped"] = exc.message
    try:
        failure = describe_failure(exc, cfg)
    except Exception:  # noqa: BLE001 - the record must be written whatever describing it does
        failure = None
    if failure is not None:
        rec["line"] = failure.line
    return rec


class RankReport(L.Callback):
    """What this rank trained on, per epoch (``ddp/rank<k>.json``): shows that every rank took part, each
    on its own share of the data. Image names are kept for the first epoch only."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.epochs: list[dict] = []
        self._names: list[str] = []
        self._batches = 0

    def on_train_epoch_start(self, trainer, pl_module):
        self._names, self._batches = [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._batches += 1
        self._names.extend(str(n) for n in batch.names)  # a polypsam.data.batch.Batch

    def on_train_epoch_end(self, trainer, pl_module):
        entry = {"epoch": trainer.current_epoch, "batches": self._batches, "images": len(self._names)}
        if not self.epochs:
            entry["names"] = self._names
        self.epochs.append(entry)
        log.info("rank %d of %d, epoch %d: %d training batches, %d images", trainer.global_rank,
                 trainer.world_size, trainer.current_epoch, self._batches, len(self._names))
        self._write(trainer)

    def _write(self, trainer):
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / f"rank{trainer.global_rank}.json").write_text(json.dumps({
            "global_rank": trainer.global_rank, "local_rank": trainer.local_rank,
            "node_rank": trainer.node_rank, "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "environment": type(trainer.strategy.cluster_environment).__name__
            if getattr(trainer.strategy, "cluster_environment", None) is not None else None,
            "epochs": self.epochs}, indent=1))
