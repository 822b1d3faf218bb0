"""Reading images (and masks) for inference in loader workers; a file that fails is reported, not raised."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from polypsam.data.io import read_image, read_mask, size_mismatch
from polypsam.errors import DataError
from polypsam.inference.predictor import preprocess
from polypsam.models.sam import ModelSpec


def as_list(items: list) -> list:
    """DataLoader ``collate_fn`` that keeps the items as they are (images of different sizes)."""
    return items


class ImageItems(Dataset):
    """Item i: ``canvas`` (3,S,S) uint8 and ``resize``; with masks also ``mask`` (H,W) bool; with
    ``keep_image`` the decoded RGB ``image``. ``status`` is ``ok``, ``unreadable`` (the image) or
    ``mask_error`` (the mask, or sizes that disagree), with the one-line ``error``. With ``proposer_spec``
    (``AutoPredictor.proposer_spec``: a proposer that reads another canvas) also ``proposer_canvas``.
    """

    def __init__(self, images: list[Path], spec: ModelSpec, masks: list[Path] | None = None,
                 keep_image: bool = False, known_unreadable: dict[str, str] | None = None,
                 proposer_spec: ModelSpec | None = None):
        self.images, self.masks, self.spec, self.keep = images, masks, spec, keep_image
        self.proposer_spec = proposer_spec
        self.known = known_unreadable or {}  # image path -> error, found by an earlier header check

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"index": i, "status": "ok", "error": ""}
        path = self.images[i]
        if self.masks is not None:
            try:
                item["mask"] = read_mask(self.masks[i])
            except DataError as exc:
                return {**item, "status": "mask_error", "error": str(exc)}
        if str(path) in self.known:
            return {**item, "status": "unreadable", "error": self.known[str(path)]}
        try:
            image = read_image(path)
        except DataError as exc:  # truncated or corrupt: reported, the rest goes on
            return {**item, "status": "unreadable", "error": str(exc)}
        if "mask" in item and image.shape[:2] != item["mask"].shape:
            err = size_mismatch(self.masks[i], item["mask"].shape, path, image.shape[:2])
            return {**item, "status": "mask_error", "error": str(err)}
        item["canvas"], item["resize"] = preprocess(image, self.spec)
        if self.proposer_spec is not None:  # same size, so the same Resize record
            item["proposer_canvas"] = preprocess(image, self.proposer_spec)[0]
        if self.keep:
            item["image"] = image
        return item
