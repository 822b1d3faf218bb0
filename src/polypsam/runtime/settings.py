"""``model.runtime`` and ``model.runtime_precision``: which runtime runs the frozen encoder, at what precision."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

RUNTIME_KEYS = ("runtime", "runtime_precision")  # in the model group, but not build_model's arguments


def default_store_dir() -> str:
    """``$POLYPSAM_CACHE_DIR/runtimes`` (default ``~/.cache/polypsam/runtimes``), as ``paths.cache_dir``."""
    return str(Path(os.environ.get("POLYPSAM_CACHE_DIR", "~/.cache/polypsam")).expanduser() / "runtimes")


@dataclass(frozen=True)
class RuntimeSettings:
    """``runtime``: auto | torch | openvino | onnxruntime; ``precision``: fp32 | bf16 | int8; ``store_dir``:
    where exported encoders are kept. The programmatic default is torch; the shipped model configs say auto."""

    runtime: str = "torch"
    precision: str = "fp32"
    store_dir: str = ""

    @property
    def store(self) -> str:
        return self.store_dir or default_store_dir()

    @classmethod
    def from_cfg(cls, cfg: Any, saved: dict | None = None) -> RuntimeSettings:
        """From a run's ``model`` group, else the ``model`` block of a checkpoint's saved config (``saved``);
        a config without the keys (an older checkpoint) means auto / fp32. The store is under ``paths.cache_dir``."""
        model = cfg.get("model") if cfg is not None else None
        if model is None:
            model = (saved or {}).get("model") or {}
        if OmegaConf.is_config(model):
            model = OmegaConf.to_container(model, resolve=True)
        paths = (cfg.get("paths") if cfg is not None else None) or {}
        cache_dir = paths.get("cache_dir") if OmegaConf.is_config(paths) or isinstance(paths, dict) else None
        return cls(runtime=str(model.get("runtime", "auto")), precision=str(model.get("runtime_precision", "fp32")),
                   store_dir=str(Path(cache_dir).expanduser() / "runtimes") if cache_dir else "")


def without_runtime_keys(settings: dict) -> dict:
    """A model group's settings as ``build_model`` takes them."""
    return {k: v for k, v in settings.items() if k not in RUNTIME_KEYS}
