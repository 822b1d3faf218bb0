"""The composed config checked before any work: one line for the first value that cannot run.

The yaml groups under ``conf/`` hold the defaults; this module holds what the values that matter may be
(``RULES``: type and range) and calls the rules that live with their code (prompt builders, the runtime
registry, the loss, ``data.num_workers``, devices), so a bad value stops the run before a model is built
or an image is read. Each entry point calls it first, with its composed config::

    check_config(cfg, "train")   # train | eval | predict | select_auto: a ConfigError, else nothing

A rule applies where its key is in the config (``eval.yaml`` has no ``optimizer``). A value that comes
from another key (``optimizer.lr: ${scratch.lr}``) is reported under the key to change (``scratch.lr``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from polypsam.devices import (
    accelerator_device,
    device_count,
    resolve_device,
    resolve_num_workers,
    usable_cpus,
)
from polypsam.errors import ConfigError

TASKS = ("train", "eval", "predict", "select_auto")


@dataclass(frozen=True)
class Rule:
    """``key``: a dotted path; ``kind``: int or float (an int is a float too, a bool is neither); the
    value lies above ``low`` and below ``high`` (inclusive unless ``*_open``); ``optional``: null allowed."""

    key: str
    kind: type
    what: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False

    @property
    def allowed(self) -> str:
        whole = "a whole number" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            return (f"{whole} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{whole} {'>' if self.low_open else '>='} {self.low:g}"
        return whole

    def fits(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


def _fraction(key: str, what: str, **open_ends) -> Rule:
    return Rule(key, float, what, 0.0, 1.0, **open_ends)


RULES = (
    Rule("optimizer.lr", float, "the learning rate", low=0, low_open=True),
    Rule("optimizer.weight_decay", float, "AdamW's weight decay", low=0),
    _fraction("optimizer.warmup_fraction", "the share of steps spent warming up", high_open=True),
    _fraction("optimizer.warmup_start_factor", "the first warm-up step's share of the learning rate", low_open=True),
    _fraction("optimizer.min_lr_factor", "the cosine schedule's floor, a share of the learning rate"),
    Rule("trainer.max_epochs", int, "the epochs to train", low=1),
    Rule("trainer.num_nodes", int, "the machines in the run", low=1),
    Rule("trainer.log_every_n_steps", int, "the steps between logged metrics", low=1),
    Rule("trainer.gradient_clip_val", float, "the gradient-norm clip", low=0, low_open=True, optional=True),
    Rule("data.batch_size", int, "images per step and device", low=1),
    Rule("data.effective_batch_size", int, "images per optimiser step (gradient accumulation is derived)", low=1),
    Rule("data.eval_batch_size", int, "images per validation batch", low=1, optional=True),
    _fraction("data.val_fraction", "the share of training images held out for validation",
              low_open=True, high_open=True),
    Rule("data.limit_train", int, "training images used", low=1, optional=True),
    Rule("data.limit_val", int, "validation images used", low=1, optional=True),
    Rule("data.limit_test", int, "test images used per set", low=1, optional=True),
    Rule("seed", int, "the seed"),
    Rule("batch_size", int, "images per batch", low=1),
    _fraction("threshold", "the probability a mask pixel needs", low_open=True, high_open=True),
    Rule("limit", int, "images predicted", low=1, optional=True),
)


def _raw(cfg: DictConfig, key: str):
    """The unresolved value at ``key`` (``${scratch.lr}``), or None where the key is absent."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    if not OmegaConf.is_dict(node) or leaf not in node:
        return None
    return OmegaConf.to_container(node, resolve=False)[leaf]


def source_key(cfg: DictConfig, key: str) -> str:
    """The key a value is set at: ``optimizer.lr`` -> ``scratch.lr`` through ``${scratch.lr}``."""
    seen = set()
    while key not in seen:
        seen.add(key)
        m = re.fullmatch(r"\$\{([\w.]+)\}", str(_raw(cfg, key)))
        if m is None:
            return key
        key = m.group(1)
    return key


def _value(cfg: DictConfig, key: str, default=None):
    try:
        return OmegaConf.select(cfg, key, default=default, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{key}: cannot be read ({' '.join(str(exc).split())[:200]}).") from None


def check_values(cfg: DictConfig) -> None:
    """Every ``RULES`` value present: its type and range."""
    absent = object()
    for rule in RULES:
        value = _value(cfg, rule.key, absent)
        if value is absent or (value is None and rule.optional) or rule.fits(value):
            continue
        name = source_key(cfg, rule.key)
        also = f" (read as {rule.key})" if name != rule.key else ""
        raise ConfigError(f"{name}={value!r}{also}: {rule.what} must be {rule.allowed}"
                          f"{' or null' if rule.optional else ''}; set {name} to one.")


def check_devices(trainer: DictConfig) -> None:
    """``trainer.devices`` against this machine: one process per device, each on a CPU core or a GPU."""
    accelerator = str(trainer.get("accelerator", "auto"))
    devices = trainer.get("devices", 1)
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator}: no CUDA GPU is visible here; use trainer=cpu "
                          "(trainer.accelerator=cpu) or run on a machine with a GPU.")
    try:
        n = device_count(devices, accelerator)
    except (TypeError, ValueError):
        raise ConfigError(f"trainer.devices={devices!r}: give a number of devices, a list of GPU indices or "
                          "auto.") from None
    kind = accelerator_device(accelerator).type
    have, what = {"cuda": (torch.cuda.device_count(), "CUDA GPU(s)"),
                  "cpu": (usable_cpus(), "usable CPU core(s)")}.get(kind, (None, ""))
    if n < 1:
        raise ConfigError(f"trainer.devices={devices}: give at least 1 device (or auto).")
    if have is not None and n > have:
        raise ConfigError(f"trainer.devices={devices}: this machine has {have} {what} (trainer.accelerator="
                          f"{accelerator}), and each device is one training process; set trainer.devices={have} "
                          "or fewer.")


def _task_device(cfg: DictConfig, task: str) -> torch.device:
    if task == "train":
        return accelerator_device(str(cfg.trainer.get("accelerator", "auto")))
    return resolve_device(str(cfg.get("device", "auto")))  # its own error for a device not here


def check_rules_with_a_home(cfg: DictConfig, task: str) -> None:
    """The rules kept beside their code, called on the composed values before anything is built."""
    from polypsam.config import prompt_from_cfg  # the prompt builders validate their settings
    from polypsam.runtime.registry import check_runtime

    if cfg.get("prompt") is not None:
        prompt_from_cfg(cfg)
    if task == "train":
        from polypsam.training.losses import SegmentationLoss

        SegmentationLoss(str(cfg.get("loss", "dice")))
        check_devices(cfg.trainer)
    if cfg.get("data") is not None and cfg.data.get("num_workers") is not None:
        resolve_num_workers(cfg.data.num_workers)
    if cfg.get("num_workers") is not None:
        resolve_num_workers(cfg.num_workers)
    model = cfg.get("model")
    if model is not None and ("runtime" in model or "runtime_precision" in model):
        # the runtime the frozen encoder or the evaluation after training will use, on this run's device
        check_runtime(str(model.get("runtime", "auto")), str(model.get("runtime_precision", "fp32")),
                      _task_device(cfg, task))


def check_config(cfg: DictConfig, task: str) -> None:
    """The composed config of ``task`` (one of ``TASKS``), checked before any model or image is touched."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}: one of {', '.join(TASKS)}")
    check_values(cfg)
    check_rules_with_a_home(cfg, task)
