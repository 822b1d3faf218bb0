"""Callbacks: validation overlays (PNG in the run, and W&B when enabled) and epoch timing."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

from polypsam.data.io import read_image
from polypsam.data.transforms import resize_image
from polypsam.drawing import overlay


class ValidationOverlays(L.Callback):
    """A few validation images per epoch: image, ground truth and prediction with the box."""

    def __init__(self, num_images: int = 4):
        self.num_images = num_images

    @rank_zero_only
    def on_validation_epoch_end(self, trainer, pl_module):
        ex = getattr(pl_module, "val_examples", None)
        if not ex or trainer.sanity_checking or self.num_images <= 0:
            return
        b, probs = ex["batch"], ex["probs"]
        tiles = []
        for j in range(min(self.num_images, probs.shape[0])):
            h, w = b["input_hw"][j].tolist()
            if "images" in b and not b["embedded"][j]:
                img = b["images"][j].permute(1, 2, 0).numpy()
            else:
                img, _ = resize_image(read_image(b["image_paths"][j]), probs.shape[-1])
            img = img[:h, :w]
            gt = b["masks"][j, 0, :h, :w].numpy()
            pred = (probs[j, 0, :h, :w] > 0.5).numpy()
            boxes = b["boxes"][b["box_image_index"] == j].numpy()
            tile = np.zeros((probs.shape[-1], probs.shape[-1], 3), np.uint8)
            tile[:h, :w] = overlay(img, gt, pred, boxes)
            tiles.append(tile)
        if not tiles:
            return
        grid = np.concatenate(tiles, axis=1)
        out_dir = Path(trainer.default_root_dir) / "overlays"
        out_dir.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out_dir / f"epoch_{trainer.current_epoch:03d}.png"), grid[..., ::-1])
        for logger in trainer.loggers:
            if logger.__class__.__name__ == "WandbLogger":
                logger.log_image(key="val/overlays", images=[grid],
                                 caption=[f"epoch {trainer.current_epoch}: green GT, red prediction, yellow box"])


class EpochTimer(L.Callback):
    """Wall time of each epoch (training and its validation), logged as ``time/epoch_s``."""

    def __init__(self):
        self.durations: list[float] = []
        self._t0 = 0.0

    def on_train_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()  # a resumed run restarts mid-epoch without on_train_epoch_start

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        dt = time.perf_counter() - self._t0
        self.durations.append(dt)
        pl_module.log("time/epoch_s", torch.tensor(dt), on_epoch=True, sync_dist=False, rank_zero_only=True)
