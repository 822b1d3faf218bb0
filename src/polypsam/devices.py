"""Devices and precision, resolved one way for every command (train, evaluate, predict, benchmarks)."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from polypsam.errors import ConfigError


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


def resolve_precision(precision, accelerator: str = "auto"):
    """``trainer.precision=auto``: what the hardware runs best, so one experiment file fits every machine.

    bf16-mixed on GPUs with native bf16 (compute capability 8.0+: A100, H100), 16-mixed with Lightning's
    gradient scaler on older GPUs (V100, the paper's), 32 on a CPU. Anything else passes through.
    """
    if str(precision) != "auto":
        return precision
    if accelerator not in ("auto", "gpu", "cuda") or not torch.cuda.is_available():
        return "32"
    return "bf16-mixed" if torch.cuda.get_device_capability() >= (8, 0) else "16-mixed"
