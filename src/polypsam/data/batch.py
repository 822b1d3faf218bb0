"""The training/validation batch: what the loader ships to the LightningModule, every field spelled out."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from polypsam.geometry import Resize
from polypsam.prompts import PromptBatch, PromptSet, collate_prompts


@dataclass
class Batch:
    """B images on the model's square canvas of side S, with K prompts among them.

    masks             (B, 1, S, S) bool: ground truth resized onto the canvas (the training loss)
    input_hw          (B, 2) long: the resized image's size inside the canvas (the rest is zero padding)
    original_hw       (B, 2) long: the image's size on disk
    prompts           K prompts in the input frame (``PromptBatch``: boxes, points, image index)
    prompts_original  per image, its prompts in original-image pixels (overlays, reports)
    index             (B,) long: item index in the dataset
    names, sources, image_paths, mask_paths, keys: per image (keys: sha256 of the image, cache key)
    embedded          (B,) bool: the image needs no encoding (embedding shipped, resident or on disk)
    embeddings        (B, C, h, w) float16 from the embedding cache (zeros where not shipped), or None
    images            (B, 3, S, S) uint8 canvases (zeros where embedded), or None when all are embedded
    masks_original    per image, the (H, W) bool ground truth at its original size, for metrics on the
                      reported definition (validation and test sets only; None in training)
    """

    masks: torch.Tensor
    input_hw: torch.Tensor
    original_hw: torch.Tensor
    prompts: PromptBatch
    prompts_original: list[PromptSet]
    index: torch.Tensor
    names: list[str]
    sources: list[str]
    image_paths: list[str]
    mask_paths: list[str]
    keys: list[str]
    embedded: torch.Tensor
    embeddings: torch.Tensor | None = None
    images: torch.Tensor | None = None
    masks_original: list[np.ndarray] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def resizes(self) -> list[Resize]:
        s = self.masks.shape[-1]
        return [Resize(tuple(o), tuple(i), s) for o, i in zip(self.original_hw.tolist(), self.input_hw.tolist())]

    def pin_memory(self) -> Batch:
        """DataLoader(pin_memory=True) calls this: page-locked tensors for faster copies to the GPU."""
        def pin(v):
            return v.pin_memory() if torch.is_tensor(v) else v

        pb = self.prompts
        return dataclasses.replace(
            self, masks=pin(self.masks), input_hw=pin(self.input_hw), embeddings=pin(self.embeddings),
            images=pin(self.images),
            prompts=PromptBatch(**{f.name: pin(getattr(pb, f.name)) for f in dataclasses.fields(pb)}))


def collate(items: list[dict[str, Any]]) -> Batch:
    """Stack the dataset's per-image items; concatenate their prompts with the image each belongs to."""
    embedded = torch.tensor(["embedding" in it or it.get("embedding_deferred", False) for it in items])
    embeddings = images = None
    if any("embedding" in it for it in items):
        ref = next(it["embedding"] for it in items if "embedding" in it)
        embeddings = torch.stack([it.get("embedding", torch.zeros_like(ref)) for it in items])
    if not embedded.all():
        ref = next(it["image"] for it in items if "image" in it)
        images = torch.stack([it.get("image", torch.zeros_like(ref)) for it in items])
    originals = [it["mask_original"] for it in items if "mask_original" in it]
    return Batch(
        masks=torch.stack([it["mask"] for it in items]),
        input_hw=torch.stack([it["input_hw"] for it in items]),
        original_hw=torch.stack([it["original_hw"] for it in items]),
        prompts=collate_prompts([it["prompts"] for it in items]),
        prompts_original=[it["prompts_original"] for it in items],
        index=torch.tensor([it["index"] for it in items]),
        names=[it["name"] for it in items],
        sources=[it["source"] for it in items],
        image_paths=[it["image_path"] for it in items],
        mask_paths=[it["mask_path"] for it in items],
        keys=[it["key"] for it in items],
        embedded=embedded,
        embeddings=embeddings,
        images=images,
        masks_original=originals if len(originals) == len(items) else None,
    )
