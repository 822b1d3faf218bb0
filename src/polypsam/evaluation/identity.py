"""What an evaluation is of: a run's identity (backbone x strategy x prompt x split) and the warning when a
prompt-free evaluation runs on a network never trained without prompts."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from polypsam.download import sha256_file
from polypsam.errors import ConfigError
from polypsam.models.registry import takes_prompts
from polypsam.prompts import PromptType, build_prompt

log = logging.getLogger("polypsam.evaluate")


def trained_prompt(meta: dict | None) -> PromptType | None:
    """The prompt type a checkpoint was trained with (box for checkpoints older than the prompt group)."""
    if meta is None:
        return None
    try:
        return build_prompt(((meta.get("config") or {}).get("prompt")) or None)
    except ConfigError:
        return None


def untrained_prompt_warning(prompt: PromptType, meta: dict | None, net=None) -> str | None:
    """A sentence when a prompt-free evaluation runs on a SAM never trained with the empty prompt (``net``:
    the network of stage 1; a prompt-free baseline needs no prompt training)."""
    if not prompt.prompt_free or (net is not None and not takes_prompts(net)):
        return None
    trained = trained_prompt(meta)
    if trained is not None and trained.prompt_free:
        return None
    who = (f"the checkpoint was trained with prompt={trained.name} ({trained.label()}) only" if trained else
           "a zero-shot SAM was pretrained with prompts only")
    return (f"prompt={prompt.name}: {who}, never with the empty prompt, so these numbers measure a network "
            "not trained for prompt-free use; train with prompt=mixed or prompt=none.")


def run_identity(meta: dict, ckpt_path: str | Path) -> dict:
    """backbone x strategy x prompt x split of a training checkpoint, for the compare table."""
    cfg = meta.get("config") or {}
    data = cfg.get("data") or {}
    split = "+".join(data.get("train_dirs") or []) or "?"
    hydra_file = Path(ckpt_path).resolve().parent.parent / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        try:  # the data config's name (pranet, colondb_cvc300, ...) when the run folder has Hydra's record
            choice = OmegaConf.load(hydra_file).hydra.runtime.choices.get("data")
        except (OSError, OmegaConfBaseException, AttributeError) as exc:
            log.debug("cannot read %s: %s", hydra_file, exc)
            choice = None
        if choice:
            split = f"{choice}:{split}"
    if data.get("split_file"):
        split += f" (split {Path(data['split_file']).name})"
    return {"model": meta["model"], "strategy": (cfg.get("strategy") or {}).get("name", "fine-tuned"),
            "trained_prompt": (cfg.get("prompt") or {}).get("type", "box"), "split": split,
            "checkpoint": str(Path(ckpt_path).resolve()), "checkpoint_sha256": sha256_file(ckpt_path),
            "task_name": cfg.get("task_name")}
