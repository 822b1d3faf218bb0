"""Evaluation as a task: of a checkpoint or a zero-shot model (the CLI), or after training (``train``)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from polypsam.config import model_from_cfg, prompt_from_cfg
from polypsam.download import sha256_file
from polypsam.errors import ConfigError
from polypsam.evaluation.records import checked_test_records
from polypsam.evaluation.report import console_summary, log_wandb, write_outputs
from polypsam.evaluation.runner import EvalResult, run_evaluation
from polypsam.evaluation.settings import EvalSettings, settings_from_cfg
from polypsam.models import available_models
from polypsam.models.registry import takes_prompts
from polypsam.models.sam import PromptableSAM
from polypsam.prompts import PromptType, auto_settings, build_prompt
from polypsam.prompts.none import NonePrompt
from polypsam.reporting.provenance import record as record_provenance
from polypsam.runtime import RuntimeSettings
from polypsam.training.checkpoints import load_model

log = logging.getLogger("polypsam.evaluate")


def evaluate_model(net: PromptableSAM, root: str | Path, out_dir: str | Path,
                   settings: EvalSettings | None = None, test_sets=None, limit_test: int | None = None,
                   split_seed: int = 42, identity: dict | None = None, wandb_run=None,
                   generate_demo: bool = False, verbose: bool = True,
                   proposer: PromptableSAM | None = None) -> EvalResult:
    """Evaluate ``net`` on every test set under ``root`` and write every output into ``out_dir``."""
    t_start = time.perf_counter()
    settings = settings or EvalSettings()
    result = run_evaluation(net, root, out_dir, settings, test_sets, limit_test, split_seed, identity,
                            generate_demo, verbose, proposer)
    write_outputs(result, settings)
    if wandb_run is not None:
        log_wandb(wandb_run, result)
    result.meta["total_seconds"] = round(time.perf_counter() - t_start, 2)  # with figures and logging
    record_provenance(result.out_dir)  # version, git commit, hardware: provenance.json
    (result.out_dir / "meta.json").write_text(json.dumps(result.meta, indent=1, default=str))
    if verbose:
        print(console_summary(result), flush=True)
    return result


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


def _wandb_from_cfg(cfg, out: Path, identity: dict):
    """A W&B run when the composed logger group has a wandb entry (logger=wandb), else None."""
    wb = (cfg.get("logger") or {}).get("wandb")
    if not wb:
        return None
    import wandb  # optional at run time: only with logger=wandb

    return wandb.init(project=wb.get("project", "polypsam"), name=wb.get("name"), group=wb.get("group"),
                      tags=list(wb.get("tags") or []), dir=str(out), job_type="eval",
                      mode="offline" if wb.get("offline") else None,
                      config={"eval": OmegaConf.to_container(cfg, resolve=True), **identity})


def _data_kwargs(cfg) -> dict:
    return {"test_sets": cfg.data.get("test_sets"), "limit_test": cfg.data.get("limit_test"),
            "split_seed": int(cfg.data.get("split_seed", 42))}


def evaluate(cfg) -> EvalResult:
    """The Hydra task: a checkpoint (``ckpt_path``) or a zero-shot model (``model=<name>``)."""
    out = Path(cfg.paths.output_dir)
    settings = settings_from_cfg(cfg)
    model_cfg = cfg.get("model")
    ckpt = cfg.get("ckpt_path")
    meta = None
    if ckpt:
        net, meta = load_model(ckpt, expected_model=model_cfg.name if model_cfg else None)
        identity = run_identity(meta, ckpt)
        settings.runtime = RuntimeSettings.from_cfg(cfg, meta.get("config"))  # no model=: the run's runtime
    elif model_cfg:
        net = model_from_cfg(model_cfg)
        identity = {"model": model_cfg.name, "strategy": "zero-shot", "split": "none", "checkpoint": None}
    else:
        raise ConfigError("nothing to evaluate: give ckpt_path=<run>/checkpoints/best.ckpt, or model=<name> "
                          f"for a zero-shot baseline (registered models: {', '.join(available_models())}).")
    if not takes_prompts(net) and settings.prompt.needs_mask:
        log.warning("model=%s is a prompt-free baseline: prompt=%s does not apply, it is evaluated with "
                    "prompt=none", net.spec.name, settings.prompt.name)
        settings.prompt = NonePrompt()
    settings.prompt, chosen = auto_settings.resolve(settings.prompt, ckpt, net.spec)  # <ckpt>.auto.json
    if chosen:
        identity["auto_settings"] = chosen
    proposer, first_meta = None, meta if ckpt else None
    if settings.prompt.from_model and settings.prompt.proposer:
        proposer, first_meta = load_model(settings.prompt.proposer)
    warning = untrained_prompt_warning(settings.prompt, first_meta, proposer or net)
    if warning:
        log.warning(warning)
        identity["untrained_prompt"] = warning
    (out / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))  # compare links it
    run = _wandb_from_cfg(cfg, out, identity)
    try:
        return evaluate_model(net, cfg.data.root, out, settings, identity=identity, wandb_run=run,
                              generate_demo=bool(cfg.data.get("generate_demo")), proposer=proposer,
                              **_data_kwargs(cfg))
    finally:
        if run is not None:
            run.finish()


def check_test_data(cfg) -> None:
    """What :func:`evaluate_after_training` would refuse (an empty or mis-scaled test set, a mask of another
    size), found before training starts rather than after it."""
    checked_test_records(cfg.data.root, **_data_kwargs(cfg))


def evaluate_after_training(cfg, best_checkpoint: str | Path, out_dir: str | Path, trainer=None) -> EvalResult:
    """What ``train`` runs on global rank 0 after fitting: the same evaluation on the best checkpoint.

    Settings come from an optional ``eval:`` block of the training config (the keys of conf/eval.yaml);
    the prompt is the run's own without its training noise unless ``eval.prompt`` says otherwise; the
    device is the trainer's; a W&B run opened by the trainer's WandbLogger receives the tables.
    """
    block = cfg.get("eval")
    ecfg = OmegaConf.create(OmegaConf.to_container(block, resolve=True) if block is not None else {})
    prompt = None if ecfg.get("prompt") else prompt_from_cfg(cfg).without_noise()
    settings = settings_from_cfg(ecfg, num_workers=cfg.data.get("num_workers", 0), prompt=prompt)
    if trainer is not None and not ecfg.get("device"):
        settings.device = str(trainer.strategy.root_device)
    cache = cfg.data.get("embedding_cache") or {}
    if settings.embedding_dir is None and cache.get("enabled", "auto") not in (False, "false"):
        settings.embedding_dir = cache.get("dir")  # the training run's cache: test images may be in it
    settings.runtime = RuntimeSettings.from_cfg(cfg)  # the training run's model.runtime and paths
    net, meta = load_model(best_checkpoint)
    run = next((lg.experiment for lg in (trainer.loggers if trainer is not None else [])
                if isinstance(lg, WandbLogger)), None)
    return evaluate_model(net, cfg.data.root, out_dir, settings, wandb_run=run,
                          identity=run_identity(meta, best_checkpoint), **_data_kwargs(cfg))
