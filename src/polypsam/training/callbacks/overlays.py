"""A few validation images per epoch, drawn at their own size with ground truth, prediction and prompts."""

from __future__ import annotations

from pathlib import Path

import cv2
import lightning as L
import numpy as np
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from polypsam.data.io import read_image
from polypsam.reporting.drawing import overlay

TILE_HEIGHT = 256


class ValidationOverlays(L.Callback):
    """The first validation images of each epoch: ground truth (green), prediction (red), prompts (yellow);
    a PNG in ``<run>/overlays/`` and, when the W&B logger is on, an image in the run. The module keeps the
    first validation batch and its probability maps at the original resolution (``val_examples``)."""

    def __init__(self, num_images: int = 4):
        self.num_images = num_images

    @rank_zero_only
    def on_validation_epoch_end(self, trainer, pl_module):
        ex = getattr(pl_module, "val_examples", None)
        if not ex or trainer.sanity_checking or self.num_images <= 0:
            return
        batch, probs = ex["batch"], ex["probs"]
        tiles = []
        for j in range(min(self.num_images, len(probs))):
            p = batch.prompts_original[j]
            drawn = overlay(read_image(batch.image_paths[j]), batch.masks_original[j], probs[j] > 0.5, p.boxes,
                            None if p.points is None else p.points.reshape(-1, 2),
                            None if p.labels is None else p.labels.reshape(-1))
            h, w = drawn.shape[:2]
            tiles.append(cv2.resize(drawn, (max(1, round(w * TILE_HEIGHT / h)), TILE_HEIGHT),
                                    interpolation=cv2.INTER_AREA))
        if not tiles:
            return
        grid = np.concatenate(tiles, axis=1)
        out_dir = Path(trainer.default_root_dir) / "overlays"
        out_dir.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out_dir / f"epoch_{trainer.current_epoch:03d}.png"), grid[..., ::-1])
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val/overlays", images=[grid],
                                 caption=[f"epoch {trainer.current_epoch}: green GT, red prediction, yellow prompt"])
