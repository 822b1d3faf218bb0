"""The work of ``python -m polypsam.predict`` (:mod:`polypsam.predict` is its command line): the network (a
checkpoint, or a registered model zero-shot), the plan checked first, the prediction, and its report lines."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from polypsam.config import model_from_cfg, prompt_from_cfg
from polypsam.errors import ConfigError, DataError
from polypsam.evaluation.identity import untrained_prompt_warning
from polypsam.models.registry import available_models
from polypsam.models.sam import PromptableSAM
from polypsam.prediction.plan import plan_jobs
from polypsam.prediction.run import run_prediction
from polypsam.prompts import auto_settings
from polypsam.runtime import RuntimeSettings
from polypsam.training.checkpoints import load_model


def load_network(ckpt_path: str | None, model_cfg: DictConfig | None
                 ) -> tuple[PromptableSAM, dict[str, Any], dict[str, Any] | None]:
    """A fine-tuned checkpoint (a run directory means its best.ckpt), or a registered model zero-shot; with
    the identity recorded per image and the checkpoint's metadata (None zero-shot)."""
    name = model_cfg.name if model_cfg is not None else None
    if ckpt_path:
        path = Path(ckpt_path).expanduser()
        if path.is_dir():
            path = (path if path.name == "checkpoints" else path / "checkpoints") / "best.ckpt"
        attention = model_cfg.get("attention", "sdpa") if model_cfg is not None else "sdpa"
        net, meta = load_model(path, expected_model=name, attention=attention)
        return net, {"model": meta["model"], "checkpoint": str(path), "zero_shot": False}, meta
    if name is None:
        raise ConfigError(f"give ckpt_path=<a polypsam checkpoint or run directory>, or model=<name> for a zero-shot "
                          f"prediction (registered: {', '.join(available_models())}).")
    return model_from_cfg(model_cfg).eval(), {"model": name, "checkpoint": None, "zero_shot": True}, None


def predict(cfg: DictConfig) -> dict:
    """The whole command: plan (all checks first), load the model, predict, report."""
    for key in ("input", "output"):
        if OmegaConf.is_missing(cfg, key) or cfg.get(key) in (None, ""):
            raise ConfigError(f"{key}= is required: python -m polypsam.predict ckpt_path=<checkpoint> "
                              "input=<folder|image> prompts=<boxes.json|boxes.csv|masks folder> output=<folder>.")
    out = Path(cfg.output).expanduser()
    if Path(cfg.input).expanduser().resolve() == out.resolve():
        raise ConfigError(f"output={out} is the input folder; write predictions to another folder.")
    box = OmegaConf.to_container(cfg.box, resolve=True) if OmegaConf.is_config(cfg.get("box")) else cfg.get("box")
    prompt = prompt_from_cfg(cfg)
    plan = plan_jobs(cfg.input, cfg.get("prompts"), box, prompt, cfg.get("limit"))
    if not plan.jobs:
        reasons = ", ".join(f"{len(v)} {k.replace('_', ' ')}" for k, v in plan.skipped.items()) or "none"
        raise DataError(f"{cfg.input}: no image to predict (skipped: {reasons}); check that prompts name the "
                        "images by file stem.")
    net, identity, meta = load_network(cfg.get("ckpt_path"), cfg.get("model"))
    runtime = RuntimeSettings.from_cfg(cfg, meta.get("config") if meta else None)  # model.runtime
    prompt, chosen = auto_settings.resolve(prompt, identity["checkpoint"], net.spec)  # <ckpt>.auto.json
    if chosen:
        identity["auto_settings"] = chosen
    proposer = None
    if prompt.from_model and prompt.proposer:
        proposer, _, meta = load_network(prompt.proposer, None)
    warning = untrained_prompt_warning(prompt, meta, proposer or net)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
        identity["untrained_prompt"] = warning
    summary = run_prediction(net, plan, out, identity, batch_size=int(cfg.batch_size),
                             num_workers=int(cfg.num_workers), device=cfg.device, precision=cfg.precision,
                             threshold=float(cfg.threshold), overlays=bool(cfg.overlays),
                             progress=bool(cfg.get("progress", True)), prompt=prompt, proposer=proposer,
                             runtime=runtime)
    for reason, files in plan.skipped.items():
        print(f"warning: skipped {len(files)} image(s), {reason.replace('_', ' ')}: {'; '.join(files[:5])}"
              f"{' ...' if len(files) > 5 else ''} (all in {out / 'summary.json'})", file=sys.stderr)
    if plan.unused_prompts:
        print(f"warning: {len(plan.unused_prompts)} prompt(s) name no input image, e.g. "
              f"{', '.join(plan.unused_prompts[:5])}", file=sys.stderr)
    if not summary["predicted"]:
        raise DataError(f"{cfg.input}: every image failed to decode ({'; '.join(plan.skipped['unreadable'][:3])}).")
    print(f"predicted {summary['predicted']} image(s) in {summary['seconds']:.1f} s "
          f"({summary['seconds_per_image']:.3f} s/image, model {summary['model_seconds_per_image']:.3f} s/image)"
          f" on {summary['device']}; masks, overlays and JSON in {out}", flush=True)
    return summary
