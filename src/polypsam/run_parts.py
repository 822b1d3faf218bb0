"""The parts of a training run, in the order ``polypsam.train`` takes them: open the run, build the parts,
fit, finish. Each reads the composed config; global rank 0 writes the run files."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

from polypsam.config import datamodule_from_cfg, derive_accumulation
from polypsam.data.files import find_test_sets
from polypsam.devices import device_count, resolve_precision
from polypsam.errors import PolypSamError
from polypsam.evaluation import check_test_data, evaluate_after_training
from polypsam.models.freeze import parameter_counts
from polypsam.reporting.provenance import record as record_provenance
from polypsam.training.callbacks import EpochTimer
from polypsam.training.checkpoints import resolve_ckpt_path, with_atomic_checkpoints
from polypsam.training.module import PolypSAMModule
from polypsam.training.run_metrics import keep_earlier_metrics
from polypsam.training.run_results import after_fit_error, earlier_zero_shot, save_zero_shot

log = logging.getLogger("polypsam.train")


def open_run(cfg: DictConfig, out: Path) -> str:
    """The run folder, a resumed run's checkpoint and split, the seed; returns this machine's precision."""
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
    return precision


def record_run(cfg: DictConfig, out: Path) -> dict:
    """config_resolved.yaml and provenance.json (version, git commit, hardware; one entry per session)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if rank_zero_only.rank == 0:
        (out / "config_resolved.yaml").write_text(OmegaConf.to_yaml(resolved))
        record_provenance(out)
    return resolved


@dataclass(frozen=True)
class Parts:
    """What fits: the module, its data, the trainer, and the batch arithmetic they were built with."""

    module: PolypSAMModule
    datamodule: L.LightningDataModule
    trainer: L.Trainer
    callbacks: list
    counts: dict
    accum: int
    effective: int


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


def build_parts(cfg: DictConfig, out: Path, module: PolypSAMModule, resolved: dict) -> Parts:
    """The data module (split.json and data_report.json: rank 0's), the batch arithmetic, callbacks,
    loggers and the trainer around ``module``."""
    net = module.net
    dm = datamodule_from_cfg(cfg, image_size=net.spec.image_size, embedding_cache=module.embedding_cache,
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
    _print_parameters(counts, module.frozen_modules, accum, effective, cfg)
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
        lg.log_hyperparams({"params": counts, "frozen_modules": module.frozen_modules,
                            "accumulate_grad_batches": accum, "effective_batch_size": effective,
                            "config": resolved})
    return Parts(module, dm, trainer, callbacks, counts, accum, effective)


def fit(cfg: DictConfig, out: Path, parts: Parts, precision: str) -> dict:
    """Zero-shot validation (a new run), the fit, and what this session ran, as built (not as asked)."""
    module, trainer, dm = parts.module, parts.trainer, parts.datamodule
    results: dict = {"model": cfg.model.name, "strategy": cfg.strategy.name, "output_dir": str(out),
                     "precision": str(precision), "encoder": module.encoder_record(precision),
                     "accumulate_grad_batches": parts.accum, "effective_batch_size": parts.effective,
                     "trainable_params": parts.counts["total"]["trainable"],
                     "frozen_params": parts.counts["total"]["frozen"]}
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
    timer = next((c for c in parts.callbacks if isinstance(c, EpochTimer)), None)
    if timer is not None:
        if timer.durations:
            results["epoch_seconds"] = timer.durations
        results["fit_sessions"] = timer.sessions()  # a run resumed over several sessions: each one's CPU and time
        if timer.complete:
            results["fit_seconds_all_sessions"] = sum(s["seconds"] for s in results["fit_sessions"])
    ckpt_cb = trainer.checkpoint_callback
    results["best_checkpoint"] = ckpt_cb.best_model_path if ckpt_cb is not None else ""
    results["best_val_dice"] = float(ckpt_cb.best_model_score) if ckpt_cb is not None and \
        ckpt_cb.best_model_score is not None else None
    results["epochs"] = trainer.current_epoch
    return results


def finish(cfg: DictConfig, out: Path, parts: Parts, results: dict) -> dict:
    """Rank 0: the evaluation after training, results.json and the one-paragraph summary."""
    best = results["best_checkpoint"]
    if cfg.get("test_after_training") and best and rank_zero_only.rank == 0:
        # the full evaluation (polypsam.evaluation) of the best checkpoint, on one process: per-image metrics,
        # tables, masks and figures in <run>/eval/; no DistributedSampler duplicates to remove
        if find_test_sets(cfg.data.root):
            try:
                evaluated = evaluate_after_training(cfg, best, out / "eval", parts.trainer)
            except PolypSamError as exc:  # the line says the checkpoints are saved and how to finish
                raise after_fit_error(exc, out, best) from exc
            results["test"] = evaluated.test_metrics()
            results["eval_dir"] = str(evaluated.out_dir)
    if rank_zero_only.rank == 0:
        results["data"] = parts.datamodule.report
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        zs = results.get("zero_shot_val_dice")
        msg = (f"validation Dice: best {results['best_val_dice']:.4f}" if results["best_val_dice"] is not None
               else "no validation Dice recorded")
        if zs is not None:
            msg += f" (zero-shot {zs:.4f})"
        print(f"\n{msg}\nrun directory: {out}\nbest checkpoint: {best}", flush=True)
    return results
