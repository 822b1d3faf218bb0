"""One image, its mask and its prompts, preprocessed for a given model."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from polypsam.data.embedding_cache import EmbeddingCache, file_digest
from polypsam.data.image_cache import ImageCache
from polypsam.data.io import read_image, read_mask, size_mismatch
from polypsam.geometry import Resize, resize_image, resize_mask, resized_hw
from polypsam.prompts import PromptType, seeded_rng

log = logging.getLogger(__name__)


@dataclass
class Record:
    image: Path
    mask: Path
    name: str  # file stem
    source: str  # data-set name (TrainDataset, Kvasir, ...)
    relpath: str  # image path relative to the data root (split files)
    key: str | None = None  # digest of the image bytes (embedding cache)
    extra: dict[str, Any] = field(default_factory=dict)


class PolypDataset(Dataset):
    """Samples as SAM sees them: uint8 image on a square canvas, mask, prompts in the input frame.

    Training sets draw prompt noise (e.g. box jitter) anew each time; other sets prompt without noise,
    with the draw of ``seeded_rng(prompt.seed, image path)`` where a prompt type samples (clicks), and
    ship the mask at its original size for metrics (``original_masks``).

    Normalisation happens on the device (``PromptableSAM.normalize``) so that workers ship uint8.
    When an embedding cache holds the image's embedding, the image is not decoded at all; else an
    image cache, if given, serves it already resized (not to augmented sets: see ``__init__``).
    """

    def __init__(self, records: list[Record], image_size: int, prompt: PromptType, train: bool = False,
                 augment=None, embedding_cache: EmbeddingCache | None = None,
                 resize_method: str = "pil_bilinear", image_cache: ImageCache | None = None,
                 original_masks: bool = False):
        self.records = records
        self.image_size = image_size
        self.resize_method = resize_method
        self.prompt = prompt if train else prompt.without_noise()
        self.original_masks = original_masks
        self.train = train
        self.augment = augment
        self.cache = embedding_cache
        if image_cache is not None and (image_cache.image_size, image_cache.resize_method) != (
                image_size, resize_method):
            raise ValueError(f"{image_cache}: an image cache of {image_cache.image_size} px "
                             f"{image_cache.resize_method} for a dataset of {image_size} px {resize_method}")
        if image_cache is not None and augment is not None:
            log.info("data.image_cache bypassed for %d augmented images: augmentation works on the "
                     "full-resolution image, so each is decoded and resized every epoch", len(records))
            image_cache = None
        self.image_cache = image_cache

    def __len__(self) -> int:
        return len(self.records)

    def _rng(self, rec: Record) -> np.random.Generator:
        if self.train and self.prompt.stochastic:
            # drawn from torch's RNG: seeded per worker and epoch by seed_everything(workers=True)
            return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        return seeded_rng(self.prompt.seed, rec.relpath)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        mask = read_mask(rec.mask)
        emb, deferred = None, False
        if self.cache is not None and rec.key:
            if self.cache.resident:  # the module holds it in device memory, or reads it once itself
                deferred = self.cache.has(rec.key)
            else:
                emb = self.cache.load(rec.key)
        encoded = emb is not None or deferred
        canvas = None
        if not encoded and self.image_cache is not None:
            canvas, rz = self._cached_canvas(rec, mask.shape)
        if not encoded and canvas is None:
            image = read_image(rec.image)
            if image.shape[:2] != mask.shape:
                raise size_mismatch(rec.mask, mask.shape, rec.image, image.shape[:2])
            if self.augment is not None:
                image, mask = self._augment(image, mask, rec)
            canvas, rz = resize_image(image, self.image_size, self.resize_method)
            if self.image_cache is not None:
                self.image_cache.save(self._key(rec), canvas[:rz.input_hw[0], :rz.input_hw[1]])
        elif encoded:  # the image is not decoded
            h, w = mask.shape
            rz = Resize((h, w), resized_hw(h, w, self.image_size), self.image_size)
        prompts = self.prompt.make(mask, self._rng(rec), noisy=self.train)
        item = {
            "mask": torch.from_numpy(resize_mask(mask, rz)).unsqueeze(0),
            "prompts": prompts.to_input(rz),
            "prompts_original": prompts,
            "input_hw": torch.tensor(rz.input_hw),
            "original_hw": torch.tensor(rz.original_hw),
            "index": i,
            "name": rec.name,
            "source": rec.source,
            "image_path": str(rec.image),
            "mask_path": str(rec.mask),
            "key": rec.key or "",
        }
        if self.original_masks:
            item["mask_original"] = mask
        if emb is not None:
            item["embedding"] = emb
        elif deferred:
            item["embedding_deferred"] = True
        else:
            item["image"] = torch.from_numpy(canvas).permute(2, 0, 1).contiguous()
        return item

    @staticmethod
    def _key(rec: Record) -> str:
        if not rec.key:  # the data module keys records up front; a bare dataset hashes on first use
            rec.key = file_digest(rec.image)
        return rec.key

    def _cached_canvas(self, rec: Record, hw: tuple[int, int]) -> tuple[np.ndarray | None, Resize | None]:
        """The padded canvas from the image cache, or (None, None) on a miss."""
        rz = Resize(tuple(hw), resized_hw(*hw, self.image_size), self.image_size)
        region = self.image_cache.load(self._key(rec), rz.input_hw)
        if region is None:
            return None, None
        canvas = np.zeros((self.image_size, self.image_size, 3), np.uint8)
        canvas[:rz.input_hw[0], :rz.input_hw[1]] = region
        return canvas, rz

    def _augment(self, image, mask, rec):
        self.augment.set_random_seed(int(torch.randint(0, 2**31 - 1, (1,)).item()))
        for _ in range(3):  # a crop may cut the polyp out; the box must come from the augmented mask
            out = self.augment(image=image, mask=mask.astype(np.uint8))
            if out["mask"].any():
                return out["image"], out["mask"].astype(bool)
        log.debug("augmentation removed the polyp of %s three times; using it unaugmented", rec.image)
        return image, mask
