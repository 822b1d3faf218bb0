"""One training job in this process, or as a DDP world this process starts (works inside Hydra multirun).

Lightning's own DDP launcher re-executes the command line once per extra rank; under ``-m`` every rank
then re-runs the whole sweep (Lightning #15737). Here the Hydra job is composed once, and its resolved
config is handed to N spawned ranks, which Lightning sees as processes created externally
(``LightningEnvironment``). When a cluster manager already started one process per device (SLURM's
``srun``, ``torchrun``, LSF's ``jsrun``), nothing is spawned: Lightning's environment for it takes over.

Files of a DDP job, next to the usual ones in the run directory:
``ddp/launch.json`` (world, port, timing, status), ``ddp/rank<k>.log`` (each rank's log, with the
traceback when it fails) and ``ddp/rank<k>.json`` (what each rank trained on, per epoch).

The pieces: :mod:`polypsam.training.spawn` starts this node's ranks and reads back their outcome;
:mod:`polypsam.training.rank` is the body of one rank and its report (``RankReport``).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from lightning.fabric.plugins.environments import LSFEnvironment, SLURMEnvironment, TorchElasticEnvironment
from omegaconf import DictConfig, OmegaConf

from polypsam.config import prompt_from_cfg
from polypsam.devices import device_count
from polypsam.errors import ConfigError
from polypsam.training.rank import run_rank
from polypsam.training.spawn import spawn_ranks

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
    name = _strategy_name(cfg)
    if world > 1:
        check_unused_parameters(cfg)
        if any(k in name for k in ("spawn", "fork", "notebook")):
            raise ConfigError(f"trainer.strategy={name}: polypsam starts the DDP ranks itself (this also "
                              "works in a Hydra multirun); use trainer.strategy=ddp.")
    external = _external_world()
    if external is not None:
        env, ext_world, rank = external
        if env == "SLURMEnvironment" and ext_world == 1 and world > 1 and nodes == 1:
            # one SLURM task holding all of this node's GPUs (sbatch without srun): start the ranks here
            return spawn_ranks(fn, cfg, devices, nodes, name, force_lightning_env=True)
        if ext_world != world:
            raise ConfigError(
                f"{env} started {ext_world} processes, but trainer.devices x trainer.num_nodes = {devices} "
                f"x {nodes} = {world}. Start one task per device (hydra/launcher=slurm sets tasks_per_node "
                "from trainer.devices and nodes from trainer.num_nodes), or set trainer.devices / num_nodes "
                "to match.")
        if world == 1:
            return fn(cfg)
        return run_rank(fn, cfg, rank, world, env)
    if world == 1:
        return fn(cfg)
    return spawn_ranks(fn, cfg, devices, nodes, name)
