"""The LightningModule: box-prompted SAM fine-tuning with per-image Dice/IoU validation."""

from __future__ import annotations

import math
from dataclasses import asdict
from functools import partial
from typing import Any

import lightning as L
import torch
from torchmetrics.segmentation import DiceScore, MeanIoU

from polypsam import __version__
from polypsam.data.embedding_cache import EmbeddingCache
from polypsam.errors import DataError
from polypsam.faults import TrainingDiverged
from polypsam.losses import SegmentationLoss
from polypsam.models.sam import PromptableSAM

CHECKPOINT_KEY = "polypsam"


def warmup_cosine(step: int, total: int, warmup: int, start_factor: float, min_factor: float) -> float:
    """LR factor: linear warm-up from ``start_factor`` to 1, then cosine down to ``min_factor``.

    The Polyp-SAM notebooks step ``LinearWarmupCosineAnnealingLR`` per epoch; stepping per optimiser step
    gives the same curve at a finer grain and does not depend on the epoch length.
    """
    if step < warmup:
        return start_factor + (1.0 - start_factor) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def valid_region(input_hw: torch.Tensor, size: int) -> torch.Tensor:
    """(B,1,S,S) float mask of the resized image inside the padded canvas."""
    r = torch.arange(size, device=input_hw.device)
    return ((r.view(1, size, 1) < input_hw[:, 0].view(-1, 1, 1))
            & (r.view(1, 1, size) < input_hw[:, 1].view(-1, 1, 1))).unsqueeze(1).float()


def _dice_metric():
    # explicit arguments: per-image ("samplewise") Dice of the foreground class, averaged over images
    return DiceScore(num_classes=2, include_background=False, average="micro", aggregation_level="samplewise",
                     input_format="index")


def _iou_metric():
    return MeanIoU(num_classes=2, include_background=False, per_class=False, input_format="index")


class PolypSAMModule(L.LightningModule):
    def __init__(self, net: PromptableSAM, loss: str = "dice", lr: float = 4e-6, weight_decay: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.999), warmup_fraction: float = 0.15,
                 warmup_start_factor: float = 0.125, min_lr_factor: float = 0.25,
                 frozen_modules: list[str] | None = None, embedding_cache: EmbeddingCache | None = None,
                 run_config: dict | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["net", "embedding_cache", "run_config"])
        self.net = net
        self.loss_fn = SegmentationLoss(loss)
        self.frozen_modules = list(frozen_modules or [])
        self.embedding_cache = embedding_cache
        self.resident: dict[str, torch.Tensor] = {}  # image key -> fp16 embedding on the device
        self.run_config = run_config or {}
        self.val_dice, self.val_iou = _dice_metric(), _iou_metric()
        self.test_metrics = torch.nn.ModuleDict()
        self.test_set_names: list[str] = []
        self.val_examples: dict[str, Any] | None = None  # first validation batch, for overlays

    # -- modes ----------------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        """Frozen parts stay in eval mode (no dropout / stochastic depth) while the rest trains."""
        super().train(mode)
        mods = dict(self.net.named_modules())
        for name in self.frozen_modules:
            mods[name].eval()
        return self

    @property
    def encoder_trainable(self) -> bool:
        return any(p.requires_grad for p in self.net.image_encoder.parameters())

    # -- forward --------------------------------------------------------------------------------------
    def _embeddings(self, batch) -> torch.Tensor | None:
        """Cached embeddings where the loader found them; the frozen encoder fills in and stores the rest."""
        if self.encoder_trainable:
            return None
        if self.embedding_cache is not None and self.embedding_cache.resident:
            return self._resident_embeddings(batch)
        emb = batch.get("embeddings")
        done = batch["embedded"].to(self.device)
        if emb is not None and bool(done.all()):
            return emb.float()
        todo = (~done).nonzero().flatten()
        with torch.no_grad():
            new = self.net.encode(batch["images"][todo], batch["input_hw"][todo])
        if self.embedding_cache is not None:
            for j, t in enumerate(todo.tolist()):
                self.embedding_cache.save(batch["keys"][t], new[j])
        if emb is None:
            return new
        emb = emb.float().clone()
        emb[todo] = new.to(emb.dtype)
        return emb

    def _resident_embeddings(self, batch) -> torch.Tensor:
        """Embeddings kept in device memory: read from the disk cache or encoded once, then served from here."""
        keys, store, cache = batch["keys"], self.resident, self.embedding_cache
        on_disk = batch["embedded"].tolist()
        for i, key in enumerate(keys):
            if key not in store and on_disk[i]:
                emb = cache.load(key)
                if emb is None:
                    raise DataError(f"{cache.path(key)}: this embedding-cache entry of {batch['image_paths'][i]} "
                                    "cannot be read; delete it and it is recomputed.")
                store[key] = emb.to(self.device, torch.float16)
        todo = [i for i, key in enumerate(keys) if key not in store]
        if todo:
            idx = torch.tensor(todo, device=self.device)
            with torch.no_grad():
                new = self.net.encode(batch["images"][idx], batch["input_hw"][idx])
            for j, i in enumerate(todo):
                cache.save(keys[i], new[j])
                store[keys[i]] = new[j].to(torch.float16)
        # the disk cache's fp16 values on every epoch, the first included
        return torch.stack([store[k] for k in keys]).float()

    def on_fit_end(self):
        self.resident.clear()  # evaluation after fit reads its own test sets

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self._embeddings(batch)
        return self.net(batch.get("images"), batch["input_hw"], batch["boxes"], batch["box_image_index"],
                        embeddings=emb, encoder_grad=self.encoder_trainable)

    def _step(self, batch):
        logits, _ = self(batch)
        valid = valid_region(batch["input_hw"], logits.shape[-1])
        target = batch["masks"].float()
        loss = self.loss_fn(logits, target, valid)
        probs = torch.sigmoid(logits.float()) * valid
        return loss, probs, target

    def training_step(self, batch, batch_idx):
        loss, _, _ = self._step(batch)
        if not torch.isfinite(loss):
            # raised before backward and the optimiser step: nothing is saved from this state
            raise TrainingDiverged(
                f"non-finite training loss ({loss.item()}) at global step {self.global_step}, epoch "
                f"{self.current_epoch}; the last good checkpoint is kept. Lower the learning rate "
                "(scratch.lr), clip gradients (trainer.gradient_clip_val=1.0) or use trainer.precision=32 / "
                "bf16-mixed.")
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["names"]))
        return loss

    def validation_step(self, batch, batch_idx):
        loss, probs, target = self._step(batch)
        pred, tgt = (probs > 0.5).long().squeeze(1), target.long().squeeze(1)
        self.val_dice.update(pred, tgt)
        self.val_iou.update(pred, tgt)
        n = len(batch["names"])
        self.log("val/loss", loss, on_epoch=True, batch_size=n, sync_dist=True)
        self.log("val/dice", self.val_dice, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("val/iou", self.val_iou, on_epoch=True, batch_size=n)
        if batch_idx == 0:
            self.val_examples = {"probs": probs.detach().float().cpu(), "batch": {
                k: (v.cpu() if torch.is_tensor(v) else v) for k, v in batch.items()
                if k not in ("embeddings",)}}

    def on_test_start(self):
        dm = self.trainer.datamodule
        self.test_set_names = list(getattr(dm, "test_sets", {}) or [])
        for name in self.test_set_names:
            if name not in self.test_metrics:
                self.test_metrics[name] = torch.nn.ModuleDict({"dice": _dice_metric(), "iou": _iou_metric()})
        self.test_metrics.to(self.device)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        name = self.test_set_names[dataloader_idx]
        _, probs, target = self._step(batch)
        pred, tgt = (probs > 0.5).long().squeeze(1), target.long().squeeze(1)
        m = self.test_metrics[name]
        m["dice"].update(pred, tgt)
        m["iou"].update(pred, tgt)
        n = len(batch["names"])
        self.log(f"test/{name}/dice", m["dice"], batch_size=n, add_dataloader_idx=False)
        self.log(f"test/{name}/iou", m["iou"], batch_size=n, add_dataloader_idx=False)

    # -- optimisation ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        factor = partial(warmup_cosine, total=total, warmup=max(1, int(round(hp.warmup_fraction * total))),
                         start_factor=hp.warmup_start_factor, min_factor=hp.min_lr_factor)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # -- checkpoints ----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {"version": __version__, "model": self.net.spec.name,
                                      "spec": asdict(self.net.spec), "frozen_modules": self.frozen_modules,
                                      "config": self.run_config}
