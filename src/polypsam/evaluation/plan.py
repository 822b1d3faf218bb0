"""An evaluation resolved once from its config: the network and its checkpoint, the settings, the prompt's
settings file, the proposer, the data and the output folder. ``tasks.run_plan`` carries it out."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from polypsam.config import model_from_cfg, prompt_from_cfg
from polypsam.download import sha256_file
from polypsam.errors import ConfigError
from polypsam.evaluation.identity import run_identity, untrained_prompt_warning
from polypsam.evaluation.settings import EvalSettings, settings_from_cfg
from polypsam.models import available_models
from polypsam.models.registry import takes_prompts
from polypsam.models.sam import PromptableSAM
from polypsam.prompts import auto_settings
from polypsam.prompts.none import NonePrompt
from polypsam.runtime import RuntimeSettings
from polypsam.training.checkpoints import load_model

log = logging.getLogger("polypsam.evaluate")


@dataclass(frozen=True)
class EvalPlan:
    """What an evaluation is of and how it runs, before any image is read."""

    net: PromptableSAM
    settings: EvalSettings
    identity: dict  # meta.json's: the run, the prompt settings file chosen, an untrained-prompt warning
    out_dir: Path
    data_root: str
    test_sets: list[str] | None = None
    limit_test: int | None = None
    split_seed: int = 42
    generate_demo: bool = False
    checkpoint: str | None = None
    meta: dict | None = None  # the checkpoint's
    proposer: PromptableSAM | None = None  # prompt=auto's stage 1 when another network (prompt.proposer)
    config_yaml: str | None = None  # config_resolved.yaml (the CLI's; compare links it)
    wandb: dict | None = None  # wandb.init's arguments (logger=wandb), its folder the output's


def data_kwargs(cfg) -> dict:
    """The test data of a config: which sets, a seeded subset."""
    return {"test_sets": cfg.data.get("test_sets"), "limit_test": cfg.data.get("limit_test"),
            "split_seed": int(cfg.data.get("split_seed", 42))}


def _wandb_init(cfg, identity: dict) -> dict | None:
    """wandb.init's arguments when the composed logger group has a wandb entry (logger=wandb), else None."""
    wb = (cfg.get("logger") or {}).get("wandb")
    if not wb:
        return None
    return {"project": wb.get("project", "polypsam"), "name": wb.get("name"), "group": wb.get("group"),
            "tags": list(wb.get("tags") or []), "job_type": "eval", "mode": "offline" if wb.get("offline") else None,
            "config": {"eval": OmegaConf.to_container(cfg, resolve=True), **identity}}


def plan_evaluation(cfg) -> EvalPlan:
    """The CLI's evaluation: a checkpoint (``ckpt_path``) or a zero-shot model (``model=<name>``)."""
    settings = settings_from_cfg(cfg)
    model_cfg = cfg.get("model")
    ckpt = cfg.get("ckpt_path")
    meta = None
    if ckpt:
        net, meta = load_model(ckpt, expected_model=model_cfg.name if model_cfg else None)
        identity = run_identity(meta, ckpt)
        # no model=: the run's runtime
        settings = dataclasses.replace(settings, runtime=RuntimeSettings.from_cfg(cfg, meta.get("config")))
    elif model_cfg:
        net = model_from_cfg(model_cfg)
        identity = {"model": model_cfg.name, "strategy": "zero-shot", "split": "none", "checkpoint": None}
    else:
        raise ConfigError("nothing to evaluate: give ckpt_path=<run>/checkpoints/best.ckpt, or model=<name> "
                          f"for a zero-shot baseline (registered models: {', '.join(available_models())}).")
    prompt = settings.prompt
    if not takes_prompts(net) and prompt.needs_mask:
        log.warning("model=%s is a prompt-free baseline: prompt=%s does not apply, it is evaluated with "
                    "prompt=none", net.spec.name, prompt.name)
        prompt = NonePrompt()
    prompt, chosen = auto_settings.resolve(prompt, ckpt, net.spec)  # <ckpt>.auto.json
    settings = dataclasses.replace(settings, prompt=prompt)
    if chosen:
        identity["auto_settings"] = chosen
    proposer, first_meta = None, meta
    if prompt.from_model and prompt.proposer:
        proposer, first_meta = load_model(prompt.proposer)
        identity["proposer_sha256"] = sha256_file(prompt.proposer)  # stage 1's bytes, as the checkpoint's
    warning = untrained_prompt_warning(prompt, first_meta, proposer or net)
    if warning:
        log.warning(warning)
        identity["untrained_prompt"] = warning
    return EvalPlan(net, settings, identity, Path(cfg.paths.output_dir), cfg.data.root, **data_kwargs(cfg),
                    generate_demo=bool(cfg.data.get("generate_demo")), checkpoint=ckpt, meta=meta,
                    proposer=proposer, config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
                    wandb=_wandb_init(cfg, identity))


def plan_after_training(cfg, best_checkpoint: str | Path, out_dir: str | Path, device: str | None = None
                        ) -> EvalPlan:
    """Training's evaluation of its best checkpoint: settings from an optional ``eval:`` block of the training
    config (the keys of conf/eval.yaml); the run's own prompt without its training noise unless
    ``eval.prompt`` says otherwise; ``device`` (the trainer's) unless ``eval.device`` names one; the training
    run's embedding cache and encoder runtime."""
    block = cfg.get("eval")
    ecfg = OmegaConf.create(OmegaConf.to_container(block, resolve=True) if block is not None else {})
    prompt = None if ecfg.get("prompt") else prompt_from_cfg(cfg).without_noise()
    settings = settings_from_cfg(ecfg, num_workers=cfg.data.get("num_workers", 0), prompt=prompt)
    if device is not None and not ecfg.get("device"):
        settings = dataclasses.replace(settings, device=device)
    cache = cfg.data.get("embedding_cache") or {}
    if settings.embedding_dir is None and cache.get("enabled", "auto") not in (False, "false"):
        settings = dataclasses.replace(settings, embedding_dir=cache.get("dir"))  # test images may be in it
    settings = dataclasses.replace(settings, runtime=RuntimeSettings.from_cfg(cfg))  # model.runtime, paths
    net, meta = load_model(best_checkpoint)
    return EvalPlan(net, settings, run_identity(meta, best_checkpoint), Path(out_dir), cfg.data.root,
                    **data_kwargs(cfg), checkpoint=str(best_checkpoint), meta=meta)
