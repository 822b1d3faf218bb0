"""``python -m polypsam.select_auto ckpt_path=<run>/checkpoints/best.ckpt data.root=<PraNet root>``.

Chooses ``prompt=auto``'s proposal settings on the checkpoint's validation split and writes them to
``<ckpt stem>.auto.json`` beside it (or ``out=``), where evaluate and predict with ``prompt=auto`` find
them. The work is done by ``polypsam.evaluation.select_auto``; this module is the command line.
"""

from __future__ import annotations

import os

import hydra

from polypsam.cli import run_cli
from polypsam.hydra_conf import CONF_DIR
from polypsam.schema import check_config


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="select_auto")
def main(cfg) -> float:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    run_cli(check_config, cfg, "select_auto")  # every value checked before any work (polypsam.schema)
    # only now: it imports Lightning (polypsam.hydra_conf)
    from polypsam.evaluation.select_auto import select_auto

    return run_cli(select_auto, cfg)["validation_dice"]["chosen"]


if __name__ == "__main__":
    main()
