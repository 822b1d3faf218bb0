"""Point prompts: clicks inside the polyp, optionally with clicks outside it.

The first positive click is the interior point farthest from the mask boundary (the centre a person
would click); further positive clicks are drawn uniformly inside the mask, negative clicks uniformly
outside it. All clicks of an image form one prompt, so every image decodes one mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from polypsam.errors import ConfigError
from polypsam.prompts.base import SINGLE_MASK_UNUSED, PromptSet, PromptType, register_prompt


def farthest_interior_point(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of the foreground pixel farthest from the background (ties: the first in raster order)."""
    padded = np.pad(mask.astype(np.uint8), 1)  # the image border counts as boundary
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(x), float(y)


def _sample(pixels: tuple[np.ndarray, np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    ys, xs = pixels
    pick = rng.integers(0, len(xs), size=n)
    return np.stack([xs[pick], ys[pick]], axis=1).astype(np.float32)


@register_prompt("point")
@dataclass(frozen=True)
class PointPrompt(PromptType):
    """num_positive clicks inside the mask (>= 1), num_negative clicks outside it.

    min_area: components smaller than this (px) get no click (the largest is kept when all are smaller).
    seed: the evaluation draw of the sampled clicks.
    """

    num_positive: int = 1
    num_negative: int = 0
    min_area: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.num_positive < 1 or self.num_negative < 0 or self.min_area < 0:
            raise ConfigError(f"prompt=point: num_positive={self.num_positive} must be >= 1, num_negative="
                              f"{self.num_negative} and min_area={self.min_area} >= 0.")

    def _foreground(self, mask: np.ndarray) -> np.ndarray:
        if self.min_area <= 0:
            return mask
        n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        if n <= 1:
            return mask
        areas = stats[1:, cv2.CC_STAT_AREA]
        keep = np.flatnonzero(areas >= self.min_area) + 1
        if keep.size == 0:
            keep = np.array([int(np.argmax(areas)) + 1])
        return np.isin(lab, keep)

    def make(self, mask: np.ndarray, rng: np.random.Generator, noisy: bool = True) -> PromptSet:
        fg = self._foreground(mask.astype(bool))
        if not fg.any():
            return PromptSet(points=np.zeros((0, self.num_positive + self.num_negative, 2), np.float32),
                             labels=np.zeros((0, self.num_positive + self.num_negative), np.int64))
        pos = [np.array([farthest_interior_point(fg)], np.float32)]
        if self.num_positive > 1:
            pos.append(_sample(np.nonzero(fg), self.num_positive - 1, rng))
        neg = []
        if self.num_negative:
            bg = np.nonzero(~mask.astype(bool))
            if len(bg[0]) == 0:  # a mask that fills the frame: no outside to click
                bg = (np.zeros(1, np.int64), np.zeros(1, np.int64))
            neg.append(_sample(bg, self.num_negative, rng))
        points = np.concatenate(pos + neg)[None]
        labels = np.array([[1] * self.num_positive + [0] * self.num_negative], np.int64)
        return PromptSet(points=points, labels=labels)

    @property
    def stochastic(self) -> bool:
        return self.num_positive > 1 or self.num_negative > 0

    @property
    def unused_parameters(self) -> tuple[str, ...]:
        # clicks use point_embeddings 1 (and 0 for negatives) and the padding point; box corners are unused
        unused = SINGLE_MASK_UNUSED + ("prompt_encoder.point_embeddings.2", "prompt_encoder.point_embeddings.3")
        return unused + (("prompt_encoder.point_embeddings.0",) if self.num_negative == 0 else ())

    def label(self) -> str:
        return f"point {self.num_positive}+{self.num_negative}" if self.num_negative else f"point {self.num_positive}"

    def describe(self) -> str:
        neg = f" and {self.num_negative} outside" if self.num_negative else ""
        return (f"{self.num_positive} click(s) inside the polyp (first: farthest from the boundary){neg}, "
                f"seed {self.seed}")
