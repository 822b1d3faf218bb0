"""Evaluation as a task: of a checkpoint or a zero-shot model (the CLI), or after training (``train``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger

from polypsam.evaluation.identity import run_identity, trained_prompt, untrained_prompt_warning
from polypsam.evaluation.plan import EvalPlan, data_kwargs, plan_after_training, plan_evaluation
from polypsam.evaluation.records import checked_test_records
from polypsam.evaluation.report import console_summary, log_wandb, write_outputs
from polypsam.evaluation.runner import EvalResult, run_evaluation
from polypsam.evaluation.settings import EvalSettings
from polypsam.models.sam import PromptableSAM
from polypsam.reporting.provenance import record as record_provenance

# the identity helpers are importable from here, where they lived before evaluation.identity
__all__ = ["check_test_data", "evaluate", "evaluate_after_training", "evaluate_model", "run_identity", "run_plan",
           "trained_prompt", "untrained_prompt_warning"]

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


def run_plan(plan: EvalPlan, wandb_run=None) -> EvalResult:
    """Carry out a plan: its config recorded, a W&B run opened for it (or ``wandb_run``, the trainer's)."""
    if plan.config_yaml is not None:
        (plan.out_dir / "config_resolved.yaml").write_text(plan.config_yaml)
    run = None
    if plan.wandb is not None:
        import wandb  # optional at run time: only with logger=wandb

        run = wandb.init(dir=str(plan.out_dir), **plan.wandb)
    try:
        return evaluate_model(plan.net, plan.data_root, plan.out_dir, plan.settings, plan.test_sets,
                              plan.limit_test, plan.split_seed, plan.identity, run or wandb_run, plan.generate_demo,
                              proposer=plan.proposer)
    finally:
        if run is not None:
            run.finish()


def evaluate(cfg) -> EvalResult:
    """The Hydra task: a checkpoint (``ckpt_path``) or a zero-shot model (``model=<name>``)."""
    return run_plan(plan_evaluation(cfg))


def check_test_data(cfg) -> None:
    """What :func:`evaluate_after_training` would refuse (an empty or mis-scaled test set, a mask of another
    size), found before training starts rather than after it."""
    checked_test_records(cfg.data.root, **data_kwargs(cfg))


def evaluate_after_training(cfg, best_checkpoint: str | Path, out_dir: str | Path, trainer=None) -> EvalResult:
    """What ``train`` runs on global rank 0 after fitting: the same evaluation on the best checkpoint
    (``plan_after_training``), on the trainer's device; a W&B run opened by the trainer's WandbLogger
    receives the tables."""
    device = str(trainer.strategy.root_device) if trainer is not None else None
    plan = plan_after_training(cfg, best_checkpoint, out_dir, device)
    run = next((lg.experiment for lg in (trainer.loggers if trainer is not None else [])
                if isinstance(lg, WandbLogger)), None)
    return run_plan(plan, wandb_run=run)
