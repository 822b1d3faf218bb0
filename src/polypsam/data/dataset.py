"""One image, its mask and its box prompts, preprocessed for a given model."""

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
from polypsam.data.io import read_image, read_mask
from polypsam.data.transforms import (
    Resize,
    box_from_mask,
    boxes_per_component,
    boxes_to_input,
    jitter_boxes,
    resize_image,
    resize_mask,
    resized_hw,
)
from polypsam.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BoxPrompt:
    """How box prompts are derived from a mask."""

    mode: str = "tight"  # "tight": one box around all foreground (the paper); "per_component": one per polyp
    jitter_px: float = 0.0  # each side moves by U(-j, j) pixels (original frame) ...
    jitter_frac: float = 0.0  # ... plus U(-f, f) times the box side
    min_component_area: int = 16

    def __post_init__(self):
        if self.mode not in ("tight", "per_component"):
            raise DataError(f"data.box.mode={self.mode!r}: choose 'tight' or 'per_component'.")

    def boxes(self, mask: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        if self.mode == "per_component":
            boxes = boxes_per_component(mask, self.min_component_area)
        else:
            b = box_from_mask(mask)
            boxes = np.zeros((0, 4), np.float32) if b is None else b[None]
        if rng is not None:
            boxes = jitter_boxes(boxes, mask.shape, rng, self.jitter_px, self.jitter_frac)
        return boxes


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
    """Samples as SAM sees them: uint8 image on a square canvas, mask, boxes in the input frame.

    Normalisation happens on the device (``PromptableSAM.normalize``) so that workers ship uint8.
    When an embedding cache holds the image's embedding, the image is not decoded at all; else an
    image cache, if given, serves it already resized (not to augmented sets: see ``__init__``).
    """

    def __init__(self, records: list[Record], image_size: int, box: BoxPrompt, train: bool = False,
                 augment=None, embedding_cache: EmbeddingCache | None = None,
                 resize_method: str = "pil_bilinear", image_cache: ImageCache | None = None):
        self.records = records
        self.image_size = image_size
        self.resize_method = resize_method
        self.box = box
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

    def _rng(self) -> np.random.Generator | None:
        if not self.train or (self.box.jitter_px <= 0 and self.box.jitter_frac <= 0):
            return None
        # drawn from torch's RNG: seeded per worker and epoch by Lightning's seed_everything(workers=True)
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))

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
                raise DataError(f"{rec.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {rec.image} is "
                                f"{image.shape[1]}x{image.shape[0]}; masks must have their image's size.")
            if self.augment is not None:
                image, mask = self._augment(image, mask, rec)
            canvas, rz = resize_image(image, self.image_size, self.resize_method)
            if self.image_cache is not None:
                self.image_cache.save(self._key(rec), canvas[:rz.input_hw[0], :rz.input_hw[1]])
        elif encoded:  # the image is not decoded
            h, w = mask.shape
            rz = Resize((h, w), resized_hw(h, w, self.image_size), self.image_size)
        boxes = self.box.boxes(mask, self._rng())
        item = {
            "mask": torch.from_numpy(resize_mask(mask, rz)).unsqueeze(0),
            "boxes": torch.from_numpy(boxes_to_input(boxes, rz)),
            "boxes_original": torch.from_numpy(boxes),
            "input_hw": torch.tensor(rz.input_hw),
            "original_hw": torch.tensor(rz.original_hw),
            "index": i,
            "name": rec.name,
            "source": rec.source,
            "image_path": str(rec.image),
            "mask_path": str(rec.mask),
            "key": rec.key or "",
        }
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


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack per-image tensors; concatenate the boxes of all images with their image index."""
    out: dict[str, Any] = {
        "masks": torch.stack([it["mask"] for it in items]),
        "input_hw": torch.stack([it["input_hw"] for it in items]),
        "original_hw": torch.stack([it["original_hw"] for it in items]),
        "boxes": torch.cat([it["boxes"] for it in items]).float(),
        "box_image_index": torch.cat([torch.full((len(it["boxes"]),), j, dtype=torch.long)
                                      for j, it in enumerate(items)]),
        "boxes_original": [it["boxes_original"] for it in items],
        "index": torch.tensor([it["index"] for it in items]),
    }
    for k in ("name", "source", "image_path", "mask_path", "key"):
        out[k + "s"] = [it[k] for it in items]
    # embedded: the module need not encode the image (its embedding came along, or is resident/on disk)
    embedded = torch.tensor(["embedding" in it or "embedding_deferred" in it for it in items])
    out["embedded"] = embedded
    if any("embedding" in it for it in items):
        ref = next(it["embedding"] for it in items if "embedding" in it)
        out["embeddings"] = torch.stack([it.get("embedding", torch.zeros_like(ref)) for it in items])
    if not embedded.all():
        ref = next(it["image"] for it in items if "image" in it)
        out["images"] = torch.stack([it.get("image", torch.zeros_like(ref)) for it in items])
    return out
