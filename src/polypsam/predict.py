"""``python -m polypsam.predict``: masks for your own images from box or point prompts.

    python -m polypsam.predict ckpt_path=<run>/checkpoints/best.ckpt input=<folder|image> \\
        prompts=<boxes.json|boxes.csv|masks folder> output=<folder>
    python -m polypsam.predict model=lite input=<image> 'box=[x0,y0,x1,y1]' output=<folder>   # zero-shot
    python -m polypsam.predict ... prompts=<masks folder> prompt=point       # clicks derived from the masks

Per image: ``masks/<stem>.png`` (0/255, original size), ``overlays/<stem>.jpg`` (prediction red, prompt
mask green, boxes yellow) and ``json/<stem>.json`` (prompts, predicted IoU, seconds); ``summary.json``
for the run. Coordinates are original-image pixels. An image that cannot be decoded, or has no prompt,
is skipped and listed; a box outside its image, or of zero area, is an error naming the image.
The work is done by ``polypsam.prediction.command``; this module is the command line.
"""

from __future__ import annotations

import os

import hydra
import torch
from omegaconf import DictConfig

from polypsam.cli import one_line, run_cli
from polypsam.hydra_conf import CONF_DIR
from polypsam.schema import check_config


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    run_cli(check_config, cfg, "predict")  # every value checked before any work (polypsam.schema)
    from polypsam.prediction.command import predict  # only now: it imports Lightning (polypsam.hydra_conf)

    run_cli(predict, cfg, on_oom=lambda exc: (
        f"out of memory on {cfg.device} ({one_line(exc)[:160]}); lower batch_size (now {cfg.batch_size}), "
        "use precision=bf16 on a recent GPU, or device=cpu."))


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()
