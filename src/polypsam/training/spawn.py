"""Starting this node's DDP ranks as spawned processes and reading back how they ended (``ddp/launch.json``,
``ddp/rank<k>.log``, global rank 0's results); :mod:`polypsam.training.launch` decides when."""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import socket
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import cloudpickle  # a dependency of submitit; unlike pickle it carries functions defined in __main__
import torch
import torch.multiprocessing as mp
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.multiprocessing.spawn import ProcessException, ProcessExitedException

from polypsam.data.demo import generate_demo_dataset
from polypsam.errors import SIGTERM_EXIT_CODE, ConfigError, PolypSamError, StoppedBySignal
from polypsam.run_dir import claim_run_dir
from polypsam.training.rank import run_rank

log = logging.getLogger("polypsam.training.launch")

RESULT_FILE = "result.pkl"


class RankFailed(PolypSamError):
    """A rank of a DDP job failed; the message is one line and names the rank's log."""


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


def spawn_ranks(fn, cfg: DictConfig, devices: int, nodes: int, strategy: str, force_lightning_env: bool = False
                ) -> dict | None:
    """Node 0's launcher holds the run folder for every rank (``polypsam.run_dir``): a second job on the folder
    stops here, before ``ddp/`` is touched, and each spawned rank takes this claim as its parent's."""
    addr, port, node_rank = _rendezvous(nodes)
    out = Path(cfg.paths.output_dir)  # resolved here: ${hydra:...} does not resolve in a spawned rank
    with claim_run_dir(out) if node_rank == 0 else nullcontext(out):
        return _start_ranks(fn, cfg, devices, nodes, strategy, force_lightning_env, out, (addr, port, node_rank))


def _start_ranks(fn, cfg: DictConfig, devices: int, nodes: int, strategy: str, force_lightning_env: bool, out: Path,
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
                            "strategy": strategy,
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
    results = run_rank(cloudpickle.loads(fn_bytes), cfg, rank, spec["world"], "LightningEnvironment")
    if rank == 0:
        path = Path(spec["ddp_dir"]) / RESULT_FILE
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(results, f)
        tmp.replace(path)
