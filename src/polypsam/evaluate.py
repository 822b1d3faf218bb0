"""``python -m polypsam.evaluate ckpt_path=<run>/checkpoints/best.ckpt data.root=<PraNet root>``.

Evaluates a fine-tuned checkpoint (or, with ``model=<name>`` and no checkpoint, a zero-shot baseline) on
every folder under ``TestDataset/``: per-image metrics at the original resolution, per-set means with
bootstrap intervals, the paper's Table 2 layout, predicted masks, best/median/worst figures and a
prompt-noise robustness sweep. Prompts come from the ``prompt`` group (``prompt=box``, ``prompt=point``).
The work is done by ``polypsam.evaluation``; this module is the command line.
"""

from __future__ import annotations

import os

import hydra

from polypsam.cli import run_cli
from polypsam.hydra_conf import CONF_DIR
from polypsam.schema import check_config


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg) -> float | None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    run_cli(check_config, cfg, "eval")  # every value checked before any work (polypsam.schema)
    from polypsam.evaluation import evaluate  # only now: it imports Lightning (polypsam.hydra_conf)

    result = run_cli(evaluate, cfg)
    return float(result.summary["dice"].mean())


if __name__ == "__main__":
    main()
