"""polypsam training checkpoints: written atomically, checked before a resume, loaded back into a model.

* :class:`AtomicCheckpointIO` / :func:`with_atomic_checkpoints`: a checkpoint is written next to its target
  and renamed over it, so a SIGKILL during a save leaves the previous file intact.
* :func:`check_resume_checkpoint` / :func:`resolve_ckpt_path`: ``ckpt_path`` (a file, a run directory or
  ``last``) as a checked file that ``trainer.fit`` can resume from, with errors that say what to do.
* :func:`read_checkpoint` / :func:`load_model`: the fine-tuned network of a checkpoint, for evaluation
  and prediction.

A checkpoint written before ``checkpoint["polypsam"]["format"]`` 2 (polypsam before its issue 18 fix) may
hold frozen parts that moved in training (a frozen LiteMedSAM encoder's BatchNorm statistics): resuming one
is refused, since the run would go on from a state its frozen parts never had; evaluating one only warns,
since the checkpoint is still the model it is (the study's errata name the runs it concerns).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from polypsam.config import model_from_cfg
from polypsam.errors import CheckpointError, ConfigError
from polypsam.models.identity import base_weights_sha256, check_base, with_base_state
from polypsam.models.sam import PromptableSAM
from polypsam.run_dir import LAST_NAME
from polypsam.training.module import CHECKPOINT_FORMAT, CHECKPOINT_KEY

log = logging.getLogger("polypsam.training.checkpoints")


# -- writing ------------------------------------------------------------------------------------------------


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
    plugins = list(plugins)
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


# -- resuming -----------------------------------------------------------------------------------------------


def is_current_format(meta: dict) -> bool:
    """Whether a checkpoint's polypsam metadata is of the current format (none: written before formats)."""
    return meta.get("format", 1) >= CHECKPOINT_FORMAT


def check_resume_checkpoint(path: str | Path, model_name: str | None = None) -> Path:
    """A training checkpoint that ``trainer.fit(ckpt_path=...)`` can resume from, checked before anything is
    built. Memory-mapped, so a large checkpoint is not read twice."""
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
    if not is_current_format(ckpt[CHECKPOINT_KEY]):
        raise CheckpointError(f"{path}: written before frozen parts were held frozen (the polypsam issue 18 fix; no "
                              f"checkpoint format {CHECKPOINT_FORMAT}), so its frozen parts may have drifted in "
                              "training: it cannot be resumed; start the run again (a new run, without resume or "
                              "ckpt_path).")
    saved = ckpt[CHECKPOINT_KEY].get("model")
    if model_name is not None and saved != model_name:
        raise CheckpointError(f"{path}: checkpoint is for model {saved!r}, but this run is model={model_name!r}; "
                              f"resume with model={saved} (or resume=<its run dir>), or start a new run.")
    return path


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | Path, model_name: str | None = None) -> str | None:
    """``ckpt_path`` as a checked file: a file as given, a run directory's ``checkpoints/last.ckpt``, or
    ``last`` for this run's own (the CLI has already turned ``last`` into a file, see
    :func:`polypsam.training.resume.resume_argv`)."""
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


# -- loading a model ----------------------------------------------------------------------------------------


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; give a run's checkpoints/best.ckpt or last.ckpt.")
    try:
        # weights_only=False: Lightning checkpoints carry optimizer and loop state; only load files you trust
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc}); the file is "
                              "corrupt or truncated. Use another one (last.ckpt, best.ckpt) or re-train.") from None
    if not isinstance(ckpt, dict) or CHECKPOINT_KEY not in ckpt or "state_dict" not in ckpt:
        hint = ""
        if isinstance(ckpt, dict) and any(k.startswith("image_encoder.") for k in ckpt):
            hint = (" It looks like an official SAM checkpoint: for a zero-shot run use model=<vit_b|vit_l|vit_h> "
                    "without ckpt_path.")
        raise CheckpointError(f"{path}: not a polypsam training checkpoint (no '{CHECKPOINT_KEY}' metadata).{hint}")
    return ckpt


def load_model(path: str | Path, expected_model: str | None = None, attention: str = "sdpa"
               ) -> tuple[PromptableSAM, dict[str, Any]]:
    """The fine-tuned network of a checkpoint and its polypsam metadata (model, spec, config).

    A LoRA checkpoint (``base_sha256`` in its metadata) holds only what trained: the model is built with its
    base weights and adapters, the digest of those base weights checked, and the saved state put on top.
    """
    ckpt = read_checkpoint(path)
    meta = ckpt[CHECKPOINT_KEY]
    name = meta["model"]
    if not is_current_format(meta):
        log.warning("%s: written before frozen parts were held frozen (the polypsam issue 18 fix): if its run "
                    "froze an encoder with BatchNorm (LiteMedSAM, strategy dec or lora), its statistics may have "
                    "moved in training and its scores may differ from its run's validation.", path)
    if expected_model is not None and expected_model != name:
        raise CheckpointError(f"{path}: checkpoint is for model {name!r}, but model={expected_model!r} was asked; "
                              f"use model={name} or another checkpoint.")
    config = meta.get("config") or {}
    base = meta.get("base_sha256")
    settings = {**(config.get("model") or {"name": name}), "attention": attention, "compile": False,
                "gradient_checkpointing": False}
    if base is None:
        settings["pretrained"] = False  # every weight is in the checkpoint
    net = model_from_cfg(settings, lora=(config.get("strategy") or {}).get("lora") if base else None)
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    if base is not None:
        check_base(base, base_weights_sha256(net), str(path))
        state = with_base_state(net, state)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit model {name!r} ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected keys, e.g. {(missing or unexpected)[:2]}).")
    return net.eval(), meta
