"""``python -m polypsam.train +experiment=<name>``: fine-tune SAM with box prompts.

Thin on purpose: a list of parts (``polypsam.run_parts``): open the run, build the module and the trainer
around it, fit (zero-shot validation first), finish (evaluation after training, results.json).
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from polypsam.cli import run_cli
from polypsam.hydra_conf import CONF_DIR
from polypsam.lightning_tips import silence_lightning_tips
from polypsam.run_dir import claim_run_dir
from polypsam.schema import check_config
from polypsam.training.resume import resume_argv

silence_lightning_tips()  # here and in every spawned DDP rank, which imports this module


def train(cfg: DictConfig) -> dict:
    """One training run in the current process (or as one DDP rank); returns the run's results.

    Global rank 0 holds the run folder while it runs (``polypsam.run_dir``): a second run asked into the same
    folder stops with one line before it writes anything there.
    """
    from lightning.pytorch.utilities import rank_zero_only  # imported after the config check (_hydra_main)

    out = Path(cfg.paths.output_dir)
    with claim_run_dir(out) if rank_zero_only.rank == 0 else nullcontext(out):
        return _train(cfg, out)


def _train(cfg: DictConfig, out: Path) -> dict:
    from polypsam.config import network_from_cfg
    from polypsam.run_parts import build_parts, finish, fit, open_run, record_run
    from polypsam.training.build import build_module

    precision = open_run(cfg, out)  # folder, resume, seed, precision
    net = network_from_cfg(cfg)  # a prompt-free baseline sets prompt=none before the config is recorded
    resolved = record_run(cfg, out)  # config_resolved.yaml, provenance.json
    module = build_module(cfg, net, run_config=resolved)  # freezing, frozen encoder, embedding cache
    parts = build_parts(cfg, out, module, resolved)  # data, trainer, callbacks, loggers
    results = fit(cfg, out, parts, precision)  # zero-shot validation, fit
    return finish(cfg, out, parts, results)  # evaluation after training, results.json


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    # data errors, divergence, out of memory, SIGTERM: one line and its exit status (polypsam.cli)
    run_cli(check_config, cfg, "train", cfg=cfg)  # every value, devices, runtime: before any work is done
    # only now: Lightning imports torchmetrics, torchvision and transformers, seconds that a bad value,
    # a folder in use or a run that cannot resume should not wait for (polypsam.hydra_conf)
    from polypsam.training.launch import run_maybe_distributed

    results = run_cli(run_maybe_distributed, train, cfg, cfg=cfg)
    return (results or {}).get("best_val_dice")


def main() -> float | None:
    """``resume=<run dir>`` / ``ckpt_path=last`` are turned into the run's own config and folder before Hydra
    starts (Hydra would otherwise open a new run directory); see ``polypsam.training.resume.resume_argv``."""
    sys.argv = run_cli(resume_argv, sys.argv)
    return _hydra_main()


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()
