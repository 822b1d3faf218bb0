"""One training job in this process, or as a DDP world this process starts (works inside Hydra multirun).

Lightning's own DDP launcher re-executes the command line once per extra rank; under ``-m`` every rank
then re-runs the whole sweep (Lightning #15737). Here the Hydra job is composed once, and its resolved
config is handed to N spawned ranks, which Lightning sees as processes created externally
(``LightningEnvironment``). When a cluster manager already started one process per device (SLURM's
``srun``, ``torchrun``, LSF's ``jsrun``), nothing is spawned: Lightning's environment for it takes over.

Files of a DDP job, next to the usual ones in the run directory:
``ddp/launch.json`` (world, port, timing, status), ``ddp/rank<k>.log`` (each rank's log, with the
traceback when it fails) and ``ddp/rank<k>.json`` (what each rank trained on, per epoch).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import socket
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import cloudpickle  # a dependency of submitit; unlike pickle it carries functions defined in __main__
import lightning as L
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.fabric.plugins.environments import LSFEnvironment, SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.multiprocessing.spawn import ProcessException, ProcessExitedException

from polypsam.cli import describe_failure, one_line
from polypsam.config import prompt_from_cfg
from polypsam.data.demo import generate_demo_dataset
from polypsam.devices import device_count
from polypsam.errors import SIGTERM_EXIT_CODE, ConfigError, PolypSamError, StoppedBySignal
from polypsam.run_dir import claim_run_dir

log = logging.getLogger("polypsam.training.launch")

RESULT_FILE = "result.pkl"


class RankFailed(PolypSamError):
    """A rank of a DDP job failed; the message is one line and names the rank's log."""


# -- the world this job asks for ------------------------------------------------------------------------


def world_plan(cfg: DictConfig) -> tuple[int, int]:
    """(processes per node, nodes) that ``cfg.trainer`` asks for."""
    devices = device_count(cfg.trainer.get("devices", 1), cfg.trainer.get("accelerator", "auto"))
    return devices, int(cfg.trainer.get("num_nodes", 1) or 1)


def _strategy_name(cfg: DictConfig) -> str:
    s = cfg.trainer.get("strategy", "auto")
    if isinstance(s, str):
        return s
    return str(s.get("_target_", "")) if OmegaConf.is_dict(s) else type(s).__name__


def _finds_unused(cfg: DictConfig) -> bool:
    s = cfg.trainer.get("strategy", "auto")
    if isinstance(s, str):
        return "find_unused_parameters_true" in s
    return OmegaConf.is_dict(s) and bool(s.get("find_unused_parameters", False))


def check_unused_parameters(cfg: DictConfig) -> None:
    """DDP with ``find_unused_parameters=False`` stops at the first step if a trainable parameter gets no
    gradient; each prompt type names the parts it never reaches (``PromptType.unused_parameters``: the IoU
    head, the multimask heads, the unused prompt embeddings). Say so before starting N processes."""
    if _finds_unused(cfg) or cfg.strategy.get("freeze_prompt_unused", True):
        return
    prompt = prompt_from_cfg(cfg)
    frozen = list(cfg.strategy.get("freeze", []) or [])
    left = [m for m in prompt.unused_parameters if not any(m == f or m.startswith(f + ".") for f in frozen)]
    if left:
        raise ConfigError(
            f"strategy.freeze_prompt_unused=false with DDP ({_strategy_name(cfg)}, "
            f"find_unused_parameters=False): {', '.join(left)} stay trainable but get no gradient from "
            f"prompt={prompt.name}, and DDP stops on them. Keep strategy.freeze_prompt_unused=true (the default), "
            "or set trainer.strategy=ddp_find_unused_parameters_true (slower: DDP searches the graph every step).")


def _external_world() -> tuple[str, int, int] | None:
    """(environment, world size, global rank) when a cluster manager started this process as one rank."""
    if SLURMEnvironment.detect():
        return "SLURMEnvironment", int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_PROCID"])
    if TorchElasticEnvironment.detect():
        return "TorchElasticEnvironment", int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if LSFEnvironment.detect():
        env = LSFEnvironment()
        return "LSFEnvironment", env.world_size(), env.global_rank()
    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:  # ranks started by hand
        return "LightningEnvironment", int(os.environ["WORLD_SIZE"]), int(os.environ.get("RANK", "0"))
    return None


# -- entry ------------------------------------------------------------------------------------------------


def run_maybe_distributed(fn: Callable[[DictConfig], dict], cfg: DictConfig) -> dict | None:
    """Run ``fn(cfg)`` once here, or on every rank of a DDP world; returns global rank 0's results."""
    devices, nodes = world_plan(cfg)
    world = devices * nodes
    if world > 1:
        check_unused_parameters(cfg)
        name = _strategy_name(cfg)
        if any(k in name for k in ("spawn", "fork", "notebook")):
            raise ConfigError(f"trainer.strategy={name}: polypsam starts the DDP ranks itself (this also "
                              "works in a Hydra multirun); use trainer.strategy=ddp.")
    external = _external_world()
    if external is not None:
        env, ext_world, rank = external
        if env == "SLURMEnvironment" and ext_world == 1 and world > 1 and nodes == 1:
            # one SLURM task holding all of this node's GPUs (sbatch without srun): start the ranks here
            return _spawn(fn, cfg, devices, nodes, force_lightning_env=True)
        if ext_world != world:
            raise ConfigError(
                f"{env} started {ext_world} processes, but trainer.devices x trainer.num_nodes = {devices} "
                f"x {nodes} = {world}. Start one task per device (hydra/launcher=slurm sets tasks_per_node "
                "from trainer.devices and nodes from trainer.num_nodes), or set trainer.devices / num_nodes "
                "to match.")
        if world == 1:
            return fn(cfg)
        return _run_rank(fn, cfg, rank, world, env)
    if world == 1:
        return fn(cfg)
    return _spawn(fn, cfg, devices, nodes)


# -- spawning the ranks -----------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (the OS picks it); each job gets its own."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _prepare_once(cfg: DictConfig) -> None:
    """Work that must not run on N ranks at once: the synthetic set is written non-atomically."""
    if cfg.data.get("generate_demo"):
        generate_demo_dataset(cfg.data.root)


def _rendezvous(nodes: int) -> tuple[str, int, int]:
    """(main address, port, this node's rank)."""
    if nodes == 1:
        return "127.0.0.1", free_port(), 0
    missing = [k for k in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"trainer.num_nodes={nodes} without a cluster manager needs "
                          f"{', '.join(missing)} in the environment of every node; on SLURM use "
                          "hydra/launcher=slurm instead.")
    return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["NODE_RANK"])


def _spawn(fn, cfg: DictConfig, devices: int, nodes: int, force_lightning_env: bool = False) -> dict | None:
    """Node 0's launcher holds the run folder for every rank (``polypsam.run_dir``): a second job on the folder
    stops here, before ``ddp/`` is touched, and each spawned rank takes this claim as its parent's."""
    addr, port, node_rank = _rendezvous(nodes)
    out = Path(cfg.paths.output_dir)  # resolved here: ${hydra:...} does not resolve in a spawned rank
    with claim_run_dir(out) if node_rank == 0 else nullcontext(out):
        return _start_ranks(fn, cfg, devices, nodes, force_lightning_env, out, (addr, port, node_rank))


def _start_ranks(fn, cfg: DictConfig, devices: int, nodes: int, force_lightning_env: bool, out: Path,
                 rendezvous: tuple[str, int, int]) -> dict | None:
    """This node's ranks, started and awaited; global rank 0's results (files: the module's docstring)."""
    addr, port, node_rank = rendezvous
    ddp_dir = out / "ddp"
    ddp_dir.mkdir(parents=True, exist_ok=True)
    for stale in [ddp_dir / RESULT_FILE, *ddp_dir.glob("error_rank*.json")]:
        stale.unlink(missing_ok=True)
    world = devices * nodes
    _prepare_once(cfg)
    container = OmegaConf.to_container(cfg, resolve=True)
    spec = {"addr": addr, "port": port, "node_rank": node_rank, "devices": devices, "world": world,
            "ddp_dir": str(ddp_dir), "force_lightning_env": force_lightning_env}
    info: dict[str, Any] = {"world_size": world, "devices_per_node": devices, "num_nodes": nodes,
                            "node_rank": node_rank, "master_addr": addr, "master_port": port,
                            "strategy": _strategy_name(cfg),
                            "accelerator": str(cfg.trainer.get("accelerator")),
                            "started_by": "polypsam.training.launch (torch.multiprocessing spawn)",
                            "parent_pid": os.getpid()}
    log.info("starting %d DDP ranks (node %d of %d) on %s:%d; logs in %s", devices, node_rank, nodes, addr,
             port, ddp_dir)
    t0 = time.perf_counter()
    ctx = None
    sigterm: list[int] = []

    def forward_sigterm(signum, frame):  # a cluster's time limit or `kill`: the ranks save last.ckpt and stop
        sigterm.append(signum)
        for p in (ctx.processes if ctx is not None else []):
            if p.is_alive():
                os.kill(p.pid, signum)

    # torch warns for each rank it stops after another failed; launch.json and the one-line error say it
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    previous = (signal.signal(signal.SIGTERM, forward_sigterm)
                if threading.current_thread() is threading.main_thread() else None)
    try:
        ctx = mp.start_processes(_spawned_rank, args=(cloudpickle.dumps(fn), container, spec), nprocs=devices,
                                 join=False, start_method="spawn")
        info["rank_pids"] = [p.pid for p in ctx.processes]
        while not ctx.join():  # on a failure: raises, after ending the other ranks (no rank is left waiting)
            pass
        info["status"] = "ok"
    except ProcessException as exc:
        rank = node_rank * devices + exc.error_index
        err = _read_error(ddp_dir, rank) or {}
        if not err and isinstance(exc, ProcessExitedException):
            err = {"type": "exit", "message": f"exited with code {exc.exit_code}"
                   + (f" ({exc.signal_name})" if exc.signal_name else "")}
        info.update(status="failed", failed_rank=rank, error=err or {"message": str(exc).strip()[-500:]})
        raise _parent_error(err, rank, world, ddp_dir, bool(sigterm)) from None
    except BaseException:  # Ctrl-C or the like in this process: no rank may be left behind
        info["status"] = "interrupted"
        for p in (ctx.processes if ctx is not None else []):
            if p.is_alive():
                p.terminate()
            p.join(timeout=30)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        info["seconds"] = round(time.perf_counter() - t0, 2)
        (ddp_dir / "launch.json").write_text(json.dumps(info, indent=1))
    result = ddp_dir / RESULT_FILE
    if node_rank != 0:
        return None
    if not result.is_file():
        raise RankFailed(f"rank 0 ended without results ({result} is missing); see {ddp_dir / 'rank0.log'}")
    try:
        with open(result, "rb") as f:
            return pickle.load(f)
    finally:
        result.unlink()


def _parent_error(err: dict, rank: int, world: int, ddp_dir: Path, got_sigterm: bool) -> BaseException:
    """The exception this process raises for a failed rank, so the CLI prints the line (and exit status) that
    the same failure gives without DDP (:func:`polypsam.cli.describe_failure`)."""
    if err.get("stopped"):
        return StoppedBySignal(err["stopped"])
    line = err.get("line") or ""
    if line.startswith("error: "):
        return RankFailed(line[len("error: "):])
    if got_sigterm or "SIGTERM" in err.get("message", ""):
        return SIGTERMException(SIGTERM_EXIT_CODE)
    where = ddp_dir / f"rank{rank}.log"
    if err.get("type") == "exit":
        return RankFailed(f"rank {rank} of {world} {err['message']}; killed (out of memory?) or crashed, "
                          f"see {where}")
    return RankFailed(f"rank {rank} of {world} failed: {err.get('type', 'error')}: {err.get('message', '?')} "
                      f"(traceback in {where})")


def _read_error(ddp_dir: Path, rank: int) -> dict | None:
    try:
        return json.loads((ddp_dir / f"error_rank{rank}.json").read_text())
    except (OSError, ValueError):
        return None


def _spawned_rank(local_rank: int, fn_bytes: bytes, container: dict, spec: dict) -> None:
    """Body of one spawned process: the environment Lightning reads for externally created ranks."""
    rank = spec["node_rank"] * spec["devices"] + local_rank
    os.environ.update(MASTER_ADDR=spec["addr"], MASTER_PORT=str(spec["port"]), WORLD_SIZE=str(spec["world"]),
                      RANK=str(rank), LOCAL_RANK=str(local_rank), NODE_RANK=str(spec["node_rank"]))
    cfg = OmegaConf.create(container)
    OmegaConf.set_struct(cfg, True)  # as Hydra hands it to a single-process run: a misspelt key is an error
    if spec["force_lightning_env"]:  # SLURM's variables are inherited: Lightning must not read them
        with open_dict(cfg):
            cfg.trainer.plugins = [{"_target_": "lightning.fabric.plugins.environments.LightningEnvironment"}]
    if "OMP_NUM_THREADS" not in os.environ and str(cfg.trainer.get("accelerator")) == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec["devices"]))  # N ranks share the cores
    results = _run_rank(cloudpickle.loads(fn_bytes), cfg, rank, spec["world"], "LightningEnvironment")
    if rank == 0:
        path = Path(spec["ddp_dir"]) / RESULT_FILE
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(results, f)
        tmp.replace(path)


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


def _run_rank(fn, cfg: DictConfig, rank: int, world: int, env: str) -> dict:
    """``fn(cfg)`` as global rank ``rank``: own log file, rank report, process group torn down at the end."""
    rank_zero_only.rank = rank  # train() writes rank-0 files before Lightning would set this
    ddp_dir = Path(cfg.paths.output_dir) / "ddp"
    ddp_dir.mkdir(parents=True, exist_ok=True)
    handler = _rank_logging(ddp_dir / f"rank{rank}.log")
    with open_dict(cfg):
        if cfg.get("callbacks") is None:
            cfg.callbacks = {}
        cfg.callbacks.rank_report = {"_target_": "polypsam.training.launch.RankReport", "dirpath": str(ddp_dir)}
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
