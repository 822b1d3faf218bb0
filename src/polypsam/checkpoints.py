"""Loading polypsam training checkpoints back into a model, with errors that say what went wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from polypsam.errors import CheckpointError
from polypsam.models import build_model
from polypsam.models.sam import PromptableSAM
from polypsam.module import CHECKPOINT_KEY


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
    """The fine-tuned network of a checkpoint and its polypsam metadata (model, spec, config)."""
    ckpt = read_checkpoint(path)
    meta = ckpt[CHECKPOINT_KEY]
    name = meta["model"]
    if expected_model is not None and expected_model != name:
        raise CheckpointError(f"{path}: checkpoint is for model {name!r}, but model={expected_model!r} was asked; "
                              f"use model={name} or another checkpoint.")
    net = build_model(name, pretrained=False, attention=attention)
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit model {name!r} ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected keys, e.g. {(missing or unexpected)[:2]}).")
    return net.eval(), meta
