"""Devices and precision, resolved one way for every command (train, evaluate, predict, benchmarks)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

from polypsam.errors import ConfigError

AUTO_WORKERS_CAP = 4  # data.num_workers=${auto_workers:4}: the default cap of loader workers per process
FULL_PRECISION = ("32", "32-true", "fp32")  # the names of float32 without autocast (Lightning's and ours)


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cgroups, SLURM's binding), else the count."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        n = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return max(1, min(n, int(slurm)) if slurm.isdigit() else n)


def processes_per_node(trainer_cfg=None) -> int:
    """Training processes sharing this node's CPUs: torchrun's LOCAL_WORLD_SIZE, else ``trainer.devices``.
    Under SLURM each task is given its own CPUs (SLURM_CPUS_PER_TASK), so it counts as one."""
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return 1
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if local.isdigit() and int(local) > 0:
        return int(local)
    if trainer_cfg is None:
        return 1
    try:
        return max(1, device_count(trainer_cfg.get("devices", 1), trainer_cfg.get("accelerator", "auto")))
    except (ValueError, TypeError):
        return 1


def resolve_num_workers(value, processes: int = 1, cpus: int | None = None, cap: int = AUTO_WORKERS_CAP) -> int:
    """``data.num_workers``: an integer is used as given; ``auto`` (or ``auto:<cap>``) gives each of the node's
    ``processes`` (DDP ranks) ``min(cap, its share of the usable CPUs - 1)`` loader workers. The one CPU left
    runs the training loop; 0 workers means loading in the main process (a 1-CPU share). On a 2-CPU machine
    this is 1 worker, so PyTorch's over-subscription warning does not appear."""
    if isinstance(value, bool):
        raise ConfigError(f"data.num_workers={value}: give an integer >= 0 or auto.")
    text = str(value).strip().lower()
    if isinstance(value, int) or text.lstrip("-").isdigit():
        n = int(text)
        if n < 0:
            raise ConfigError(f"data.num_workers={n}: give an integer >= 0 or auto.")
        return n
    if text.startswith("auto:") and text[5:].isdigit():
        text, cap = "auto", int(text[5:])
    if text != "auto":
        raise ConfigError(f"data.num_workers={value!r}: give an integer >= 0, auto or auto:<cap>.")
    share = (usable_cpus() if cpus is None else cpus) // max(1, processes)
    return max(0, min(int(cap), share - 1))


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``/None: the first CUDA GPU when one is visible, else the CPU. A CUDA device that is not
    visible is an error, not a silent fall-back to the CPU."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device={device}: not a device name; use auto, cpu, cuda or cuda:<index>.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device}: no CUDA GPU is visible here; use device=cpu or device=auto.")
    return dev


def accelerator_device(accelerator: str = "auto") -> torch.device:
    """The device type a Lightning ``trainer.accelerator`` trains on here: cuda when asked or found, else cpu."""
    accelerator = str(accelerator)
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if accelerator == "mps" else "cpu")


def device_count(devices, accelerator: str = "auto") -> int:
    """Processes per node that Lightning will use for ``trainer.devices``."""
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    if isinstance(devices, str):
        if devices in ("auto", "-1"):
            if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
                return torch.cuda.device_count()
            return 1
        return len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices)
    return int(devices)


def cpu_has_amx_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether the CPU has Intel AMX bf16 tiles (Xeon 4th generation, 2023, and later): bf16 autocast pays there."""
    try:
        return "amx_bf16" in Path(cpuinfo).read_text().split()
    except OSError:  # no /proc (macOS, Windows): no claim
        return False


def resolve_precision(precision, accelerator: str = "auto", cpuinfo: str | Path = "/proc/cpuinfo"):
    """``trainer.precision=auto``: what the hardware runs best, so one experiment file fits every machine.

    bf16-mixed on GPUs with native bf16 (compute capability 8.0+: A100, H100), 16-mixed with Lightning's
    gradient scaler on older GPUs (V100, the paper's). On a CPU, bf16-mixed where it has AMX: measured on a
    2-core Xeon, a LoRA step 1.6x and a U-Net step 2.0x faster, and the LoRA run's validation Dice within
    0.001 of fp32 (``benchmarks/RESULTS.md``, the study's ``lora_box_bf16_s42``); 32 on other CPUs, where
    bf16 is emulated and slower. Anything else passes through.
    """
    if str(precision) != "auto":
        return precision
    if accelerator not in ("auto", "gpu", "cuda") or not torch.cuda.is_available():
        return "bf16-mixed" if cpu_has_amx_bf16(cpuinfo) else "32"
    return "bf16-mixed" if torch.cuda.get_device_capability() >= (8, 0) else "16-mixed"


def autocast(device: torch.device, precision: str | int = "32"):
    """The autocast context for inference at ``precision`` (32, bf16 or 16; Lightning's names accepted)."""
    precision = str(precision)
    if precision in FULL_PRECISION:
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16, "16": torch.float16, "16-mixed": torch.float16,
             "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ConfigError(f"precision={precision}: choose 32, bf16 or 16.")
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("precision=16 needs a GPU; use precision=32 or bf16 on the CPU.")
    return torch.autocast(device.type, dtype=dtype)
