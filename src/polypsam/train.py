"""``python -m polypsam.train +experiment=<name>``: fine-tune SAM with box prompts.

Thin on purpose: compose the config, build model / data / trainer from it, validate zero-shot, fit,
keep the best validation Dice, report.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

from polypsam.callbacks import EpochTimer
from polypsam.checkpoints import resolve_ckpt_path, with_atomic_checkpoints
from polypsam.cli import run_cli
from polypsam.config import (
    CONF_DIR,
    datamodule_from_cfg,
    derive_accumulation,
    embedding_cache_from_cfg,
    frozen_encoder_from_cfg,
    model_from_cfg,
    prompt_from_cfg,
)
from polypsam.data.files import find_test_sets
from polypsam.devices import device_count, resolve_precision
from polypsam.errors import PolypSamError
from polypsam.evaluation import check_test_data, evaluate_after_training
from polypsam.launch import run_maybe_distributed
from polypsam.lightning_tips import silence_lightning_tips
from polypsam.models.freeze import freeze_strategy, parameter_counts
from polypsam.models.registry import takes_prompts
from polypsam.module import PolypSAMModule
from polypsam.provenance import record as record_provenance
from polypsam.resume import resume_argv
from polypsam.run_dir import claim_run_dir
from polypsam.run_metrics import keep_earlier_metrics
from polypsam.run_results import after_fit_error, earlier_zero_shot, save_zero_shot
from polypsam.schema import check_config

log = logging.getLogger("polypsam.train")
silence_lightning_tips()  # here and in every spawned DDP rank, which imports this module


def _instantiate_dict(group: DictConfig | None) -> list:
    return [instantiate(v) for v in (group or {}).values() if v is not None and "_target_" in v]


@rank_zero_only
def _print_parameters(counts: dict, frozen: list[str], accum: int, effective: int, cfg: DictConfig) -> None:
    t = Table(title=f"{cfg.model.name} / strategy {cfg.strategy.name}")
    t.add_column("part")
    t.add_column("trainable", justify="right")
    t.add_column("frozen", justify="right")
    for name, c in counts.items():
        t.add_row(name, f"{c['trainable']:,}", f"{c['frozen']:,}")
    con = Console()
    con.print(t)
    shown = ", ".join(frozen[:8]) + (f", ... ({len(frozen)} in all)" if len(frozen) > 8 else "")
    con.print(f"frozen modules: {shown or 'none'}")
    con.print(f"effective batch {effective} = batch {cfg.data.batch_size} x devices "
              f"{device_count(cfg.trainer.devices, cfg.trainer.accelerator)} x nodes {cfg.trainer.num_nodes} "
              f"x accumulation {accum} (asked for {cfg.data.effective_batch_size})")


def train(cfg: DictConfig) -> dict:
    """One training run in the current process (or as one DDP rank); returns the run's results.

    Global rank 0 holds the run folder while it runs (``polypsam.run_dir``): a second run asked into the same
    folder stops with one line before it writes anything there.
    """
    out = Path(cfg.paths.output_dir)
    with claim_run_dir(out) if rank_zero_only.rank == 0 else nullcontext(out):
        return _train(cfg, out)


def _train(cfg: DictConfig, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    # resuming: a checked checkpoint file (a run dir or "last" resolved) and the run's own split
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), out, cfg.model.name)
    if ckpt_path is not None:
        with open_dict(cfg):
            cfg.ckpt_path = ckpt_path
            if not cfg.data.get("split_file") and (out / "split.json").is_file():
                cfg.data.split_file = str(out / "split.json")
    L.seed_everything(cfg.seed, workers=True)
    precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    if precision != cfg.trainer.precision:
        log.info("trainer.precision=%s: %s on this machine", cfg.trainer.precision, precision)
        cfg.trainer.precision = precision
    net = model_from_cfg(cfg.model, lora=cfg.strategy.get("lora"))  # strategy=lora: peft adapters on the encoder
    prompt = prompt_from_cfg(cfg)
    if not takes_prompts(net) and not prompt.prompt_free:
        # a baseline segments the whole image: one prompt-free query per image, in training and evaluation
        log.warning("model=%s is a prompt-free baseline: prompt=%s does not apply, the run uses prompt=none",
                    cfg.model.name, prompt.name)
        with open_dict(cfg):
            cfg.prompt = {"type": "none"}
        prompt = prompt_from_cfg(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if rank_zero_only.rank == 0:
        (out / "config_resolved.yaml").write_text(OmegaConf.to_yaml(resolved))
        record_provenance(out)  # version, git commit, hardware: provenance.json, one entry per session
    unused = prompt.unused_parameters if cfg.strategy.get("freeze_prompt_unused", True) else ()
    frozen = freeze_strategy(net, cfg.strategy.freeze, unused)
    encoder = frozen_encoder_from_cfg(cfg, net)  # model.runtime: OpenVINO / ONNX Runtime on a CPU
    cache = embedding_cache_from_cfg(cfg, net, encoder)
    # split.json and data_report.json are run files, written by global rank 0 only ("" = none)
    dm = datamodule_from_cfg(cfg, image_size=net.spec.image_size, embedding_cache=cache,
                             output_dir=str(out) if rank_zero_only.rank == 0 else "",
                             resize_method=net.spec.resize_method)
    if cfg.get("test_after_training") and find_test_sets(cfg.data.root):
        check_test_data(cfg)  # an empty or mis-scaled test set stops the run now, not after training

    devices = device_count(cfg.trainer.devices, cfg.trainer.accelerator)
    accum, effective = derive_accumulation(cfg.data.effective_batch_size, cfg.data.batch_size, devices,
                                           cfg.trainer.num_nodes)
    if effective != cfg.data.effective_batch_size:
        log.warning("effective batch %d is not a multiple of batch x devices x nodes; using %d",
                    cfg.data.effective_batch_size, effective)
    counts = parameter_counts(net)
    _print_parameters(counts, frozen, accum, effective, cfg)

    module = PolypSAMModule(net, loss=cfg.loss, frozen_modules=frozen, embedding_cache=cache, frozen_encoder=encoder,
                            run_config=resolved, **OmegaConf.to_container(cfg.optimizer, resolve=True))
    callbacks = _instantiate_dict(cfg.get("callbacks"))
    loggers = _instantiate_dict(cfg.get("logger"))
    if cfg.get("ckpt_path") is not None and rank_zero_only.rank == 0:
        for lg in loggers:  # Lightning's CSVLogger would delete the epochs logged before the resume
            if isinstance(lg, CSVLogger):
                keep_earlier_metrics(lg.log_dir)
    # checkpoints are written atomically: a kill during a save keeps the previous last.ckpt
    plugins = with_atomic_checkpoints([instantiate(p) for p in (cfg.trainer.get("plugins") or [])])
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers,
                                     accumulate_grad_batches=accum, plugins=plugins)
    for lg in trainer.loggers:
        lg.log_hyperparams({"params": counts, "frozen_modules": frozen, "accumulate_grad_batches": accum,
                            "effective_batch_size": effective, "config": resolved})

    # what this session ran, as built (not as asked): a resumed run records its own session's
    results: dict = {"model": cfg.model.name, "strategy": cfg.strategy.name, "output_dir": str(out),
                     "precision": str(precision), "encoder": module.encoder_record(precision),
                     "accumulate_grad_batches": accum, "effective_batch_size": effective,
                     "trainable_params": counts["total"]["trainable"], "frozen_params": counts["total"]["frozen"]}
    resuming = cfg.get("ckpt_path") is not None
    if cfg.get("validate_before_training") and not resuming:
        t0 = time.perf_counter()
        zero = trainer.validate(module, datamodule=dm, verbose=False)[0]
        results["zero_shot_val_dice"] = zero.get("val/dice")
        results["zero_shot_val_iou"] = zero.get("val/iou")
        results["zero_shot_val_seconds"] = time.perf_counter() - t0
        if rank_zero_only.rank == 0:
            save_zero_shot(out, results)  # a resumed run skips the zero-shot validation: it reads these
    elif resuming:
        results.update(earlier_zero_shot(out))
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
    results["fit_seconds"] = time.perf_counter() - t0
    timer = next((c for c in callbacks if isinstance(c, EpochTimer)), None)
    if timer is not None and timer.durations:
        results["epoch_seconds"] = timer.durations
    ckpt_cb = trainer.checkpoint_callback
    best = ckpt_cb.best_model_path if ckpt_cb is not None else ""
    results["best_checkpoint"] = best
    results["best_val_dice"] = float(ckpt_cb.best_model_score) if ckpt_cb is not None and \
        ckpt_cb.best_model_score is not None else None
    results["epochs"] = trainer.current_epoch
    if cfg.get("test_after_training") and best and rank_zero_only.rank == 0:
        # the full evaluation (polypsam.evaluation) of the best checkpoint, on one process: per-image metrics,
        # tables, masks and figures in <run>/eval/; no DistributedSampler duplicates to remove
        if find_test_sets(cfg.data.root):
            try:
                evaluated = evaluate_after_training(cfg, best, out / "eval", trainer)
            except PolypSamError as exc:  # the line says the checkpoints are saved and how to finish
                raise after_fit_error(exc, out, best) from exc
            results["test"] = evaluated.test_metrics()
            results["eval_dir"] = str(evaluated.out_dir)
    if rank_zero_only.rank == 0:
        results["data"] = dm.report
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        zs = results.get("zero_shot_val_dice")
        msg = (f"validation Dice: best {results['best_val_dice']:.4f}" if results["best_val_dice"] is not None
               else "no validation Dice recorded")
        if zs is not None:
            msg += f" (zero-shot {zs:.4f})"
        print(f"\n{msg}\nrun directory: {out}\nbest checkpoint: {best}", flush=True)
    return results


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    # data errors, divergence, out of memory, SIGTERM: one line and its exit status (polypsam.cli)
    run_cli(check_config, cfg, "train", cfg=cfg)  # every value, devices, runtime: before any work is done
    results = run_cli(run_maybe_distributed, train, cfg, cfg=cfg)
    return (results or {}).get("best_val_dice")


def main() -> float | None:
    """``resume=<run dir>`` / ``ckpt_path=last`` are turned into the run's own config and folder before Hydra
    starts (Hydra would otherwise open a new run directory); see ``polypsam.resume.resume_argv``."""
    sys.argv = run_cli(resume_argv, sys.argv)
    return _hydra_main()


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()
