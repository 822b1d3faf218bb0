"""The LightningModule: prompted SAM fine-tuning, validated by per-image Dice/IoU at the original size."""

from __future__ import annotations

import math
from dataclasses import asdict
from functools import partial
from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric

from polypsam import __version__
from polypsam.data.batch import Batch
from polypsam.data.embedding_cache import EmbeddingCache
from polypsam.devices import FULL_PRECISION
from polypsam.errors import DataError, TrainingDiverged
from polypsam.inference import original_probabilities
from polypsam.metrics import dice_iou
from polypsam.models.frozen import FrozenParts
from polypsam.models.identity import base_weights_sha256, check_base, trainable_state, with_base_state
from polypsam.models.lora import has_lora
from polypsam.models.sam import PromptableSAM
from polypsam.runtime import FrozenEncoder, TorchEncoder
from polypsam.runtime.encoder import EXACT_PRECISION
from polypsam.training.losses import SegmentationLoss

CHECKPOINT_KEY = "polypsam"
# checkpoint["polypsam"]["format"]: 2 once frozen parts are held frozen (polypsam issue 18) and checked against
# the model as built; one without it may hold drifted frozen parts and is not resumed (checkpoints.py)
CHECKPOINT_FORMAT = 2


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


class PolypSAMModule(L.LightningModule):
    def __init__(self, net: PromptableSAM, loss: str = "dice", lr: float = 4e-6, weight_decay: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.999), warmup_fraction: float = 0.15,
                 warmup_start_factor: float = 0.125, min_lr_factor: float = 0.25,
                 frozen_modules: list[str] | None = None, embedding_cache: EmbeddingCache | None = None,
                 run_config: dict | None = None, frozen_encoder: FrozenEncoder | None = None,
                 norm_eval_modules: list[str] | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["net", "embedding_cache", "run_config", "frozen_encoder"])
        self.net = net
        self.loss_fn = SegmentationLoss(loss)
        self.frozen_modules = list(frozen_modules or [])
        # reference: the network as built, not a restore
        self.frozen = FrozenParts(net, self.frozen_modules, norm_eval_modules or ())
        self.embedding_cache = embedding_cache
        # the frozen encoder's no-grad passes (cache fill): torch, or model.runtime's (polypsam.runtime)
        self.frozen_encoder = frozen_encoder or TorchEncoder(net)
        self.resident: dict[str, torch.Tensor] = {}  # image key -> fp16 embedding on the device
        self.run_config = run_config or {}
        # the reported metric: per-image Dice/IoU at the original resolution (metrics.dice_iou, as evaluate)
        self.val_dice, self.val_iou = MeanMetric(), MeanMetric()
        self.val_examples: dict[str, Any] | None = None  # first validation batch, for overlays
        # LoRA: checkpoints hold the trainable state and the sha256 of the frozen base weights it adapts
        self.base_sha256 = base_weights_sha256(net) if has_lora(net) else None

    # -- frozen parts: eval mode whenever they run, bit-identical state (models.frozen) ---------------
    def setup(self, stage: str) -> None:
        if stage == "fit":  # before Lightning's model summary, which counts the modes
            self.frozen.set_training_modes(self.net)

    def on_fit_start(self) -> None:
        # after Lightning restored ckpt_path: a checkpoint whose frozen parts differ from the model is refused
        if self.trainer.ckpt_path is not None:
            self.frozen.check_resumed(self.net, str(self.trainer.ckpt_path))
        else:
            self.frozen.check(self.net, "before fit")

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        # Lightning 2.6 never calls train() in fit and restores each submodule's own flag after validation:
        # the modes are set here, before every batch (a walk over the modules, microseconds)
        self.frozen.set_training_modes(self.net)

    def on_fit_end(self) -> None:
        self.frozen.check(self.net, "during fit")
        self.resident.clear()  # evaluation after fit reads its own test sets

    @property
    def encoder_trainable(self) -> bool:
        return any(p.requires_grad for p in self.net.image_encoder.parameters())

    def encoder_record(self, precision: str) -> dict:
        """What runs the image encoder in this module's passes, for results.json. A trainable encoder (enc_dec,
        LoRA, a baseline) is torch at the trainer's ``precision``; a frozen one is the frozen encoder as built,
        under the trainer's autocast only where torch runs it without a cache (``_encode_frozen``); a runtime
        that fell back (to torch, or to another precision) says why."""
        enc = self.frozen_encoder
        autocast = self.encoder_trainable or (self.embedding_cache is None and isinstance(enc, TorchEncoder))
        name = EXACT_PRECISION if str(precision) in FULL_PRECISION else str(precision)
        record = {"runtime": "torch" if self.encoder_trainable else enc.runtime,
                  "precision": name if autocast else enc.precision, "trains": self.encoder_trainable}
        if enc.fallback and not self.encoder_trainable:
            record["fallback"] = enc.fallback
        return record

    # -- forward --------------------------------------------------------------------------------------
    def _embeddings(self, batch: Batch) -> torch.Tensor | None:
        """Cached embeddings where the loader found them; the frozen encoder fills in and stores the rest."""
        if self.encoder_trainable:
            return None
        if self.embedding_cache is not None and self.embedding_cache.resident:
            return self._resident_embeddings(batch)
        emb = batch.embeddings
        done = batch.embedded.to(self.device)
        if emb is not None and bool(done.all()):
            return emb.float()
        todo = (~done).nonzero().flatten()
        new = self._encode_frozen(batch.images[todo], batch.input_hw[todo])
        if self.embedding_cache is not None:
            for j, t in enumerate(todo.tolist()):
                self.embedding_cache.save(batch.keys[t], new[j])
        if emb is None:
            return new
        emb = emb.float().clone()
        emb[todo] = new.to(emb.dtype)
        return emb

    def _encode_frozen(self, images: torch.Tensor, input_hw: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's pass. With a cache, outside Lightning's mixed-precision autocast (bf16-mixed,
        16-mixed): its entries are keyed as exact (fp32) embeddings, so a bf16 run must not write bf16 ones,
        and every run, whatever its precision, reads the embeddings evaluation computes."""
        if self.embedding_cache is None:
            return self.frozen_encoder.encode(images, input_hw)
        with torch.autocast(self.device.type, enabled=False):
            return self.frozen_encoder.encode(images, input_hw)

    def _resident_embeddings(self, batch: Batch) -> torch.Tensor:
        """Embeddings kept in device memory: read from the disk cache or encoded once, then served from here."""
        keys, store, cache = batch.keys, self.resident, self.embedding_cache
        on_disk = batch.embedded.tolist()
        for i, key in enumerate(keys):
            if key not in store and on_disk[i]:
                emb = cache.load(key)
                if emb is None:
                    raise DataError(f"{cache.path(key)}: this embedding-cache entry of {batch.image_paths[i]} "
                                    "cannot be read; delete it and it is recomputed.")
                store[key] = emb.to(self.device, torch.float16)
        todo = [i for i, key in enumerate(keys) if key not in store]
        if todo:
            idx = torch.tensor(todo, device=self.device)
            new = self._encode_frozen(batch.images[idx], batch.input_hw[idx])
            for j, i in enumerate(todo):
                cache.save(keys[i], new[j])
                store[keys[i]] = new[j].to(torch.float16)
        # the disk cache's fp16 values on every epoch, the first included
        return torch.stack([store[k] for k in keys]).float()

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self._embeddings(batch)
        pb = batch.prompts
        return self.net(batch.images, batch.input_hw, pb.boxes, pb.image_index, embeddings=emb,
                        encoder_grad=self.encoder_trainable, points=pb.point_pairs, prompt_free=pb.prompt_free)

    def _step(self, batch: Batch):
        logits, _ = self(batch)
        valid = valid_region(batch.input_hw, logits.shape[-1])
        loss = self.loss_fn(logits, batch.masks.float(), valid)
        return loss, logits

    def training_step(self, batch: Batch, batch_idx):
        loss, _ = self._step(batch)
        if not torch.isfinite(loss):
            # raised before backward and the optimiser step: nothing is saved from this state
            raise TrainingDiverged(
                f"non-finite training loss ({loss.item()}) at global step {self.global_step}, epoch "
                f"{self.current_epoch}; the last good checkpoint is kept. Lower the learning rate "
                "(scratch.lr), clip gradients (trainer.gradient_clip_val=1.0) or use trainer.precision=32 / "
                "bf16-mixed.")
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch))
        return loss

    def validation_step(self, batch: Batch, batch_idx):
        """Loss on the canvas; Dice and IoU per image at the original resolution, as ``evaluate`` scores."""
        loss, logits = self._step(batch)
        probs = [p.cpu().numpy() for p in original_probabilities(logits, batch.resizes)]
        scores = [dice_iou(p > 0.5, m) for p, m in zip(probs, batch.masks_original)]
        n = len(batch)
        self.val_dice.update(torch.tensor([d for d, _ in scores], dtype=torch.float64, device=self.device))
        self.val_iou.update(torch.tensor([i for _, i in scores], dtype=torch.float64, device=self.device))
        self.log("val/loss", loss, on_epoch=True, batch_size=n, sync_dist=True)
        self.log("val/dice", self.val_dice, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("val/iou", self.val_iou, on_epoch=True, batch_size=n)
        if batch_idx == 0:
            self.val_examples = {"probs": probs, "batch": batch}

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
        self.frozen.check(self.net, f"before the checkpoint of global step {self.global_step}")
        checkpoint[CHECKPOINT_KEY] = {"format": CHECKPOINT_FORMAT, "version": __version__,
                                      "model": self.net.spec.name, "spec": asdict(self.net.spec),
                                      "frozen_modules": self.frozen_modules, "config": self.run_config,
                                      "base_sha256": self.base_sha256}
        if self.base_sha256 is not None:
            frozen = [f"net.{name}" for name in self.frozen_modules]
            checkpoint["state_dict"] = trainable_state(self, checkpoint["state_dict"], frozen)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resuming a LoRA run: the same base weights, completed from this model's own."""
        if self.base_sha256 is not None:
            where = self._trainer.ckpt_path if self._trainer is not None else None
            check_base(checkpoint.get(CHECKPOINT_KEY, {}).get("base_sha256"), self.base_sha256,
                       str(where or "the checkpoint"))
            checkpoint["state_dict"] = with_base_state(self, checkpoint["state_dict"])
