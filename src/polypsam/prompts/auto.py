"""Automatic prompts, two stages: a prompt-free pass proposes boxes, a box-prompted pass refines each.

This module holds the settings and the proposal geometry (probability map -> boxes with scores);
``inference.AutoPredictor`` runs the two passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np

from polypsam.errors import ConfigError
from polypsam.prompts.base import PromptSet, PromptType, register_prompt
from polypsam.prompts.box import BoxPrompt

_CANNOT_TRAIN = ("prompt=auto proposes its boxes with the network, not from a mask, so it cannot train: "
                 "train with prompt=mixed (or prompt=none), then evaluate or predict with prompt=auto.")


@register_prompt("auto")
@dataclass(frozen=True)
class AutoPrompt(PromptType):
    """proposer: a checkpoint for stage 1 (its model and preprocessing must equal the refiner's); None:
    the evaluated or predicted network proposes for itself.

    threshold: stage-1 probability above which a pixel is foreground.
    min_score: a component is proposed when its mean stage-1 probability reaches this.
    min_area: ... and when it covers at least this fraction of the frame (specular highlights are small).
    margin / margin_px: each side of a proposed box moves out by margin x its side + margin_px, because
      a box-prompted SAM expects a box around the polyp, not inside it.
    max_boxes: proposals kept per frame, highest score first.
    """

    proposer: str | None = None
    threshold: float = 0.5
    min_score: float = 0.6
    min_area: float = 0.002
    margin: float = 0.1
    margin_px: float = 4.0
    max_boxes: int = 3
    seed: int = 0
    from_model: ClassVar[bool] = True

    def __post_init__(self):
        if not (0 < self.threshold < 1 and 0 <= self.min_score <= 1 and 0 <= self.min_area < 1):
            raise ConfigError(f"prompt=auto: threshold={self.threshold} must lie in (0, 1), min_score="
                              f"{self.min_score} in [0, 1] and min_area={self.min_area} (a fraction of the "
                              "frame) in [0, 1).")
        if self.margin < 0 or self.margin_px < 0 or self.max_boxes < 1:
            raise ConfigError(f"prompt=auto: margin={self.margin} and margin_px={self.margin_px} must be >= 0 "
                              f"and max_boxes={self.max_boxes} >= 1.")

    @property
    def prompt_free(self) -> bool:
        return True

    @property
    def needs_mask(self) -> bool:
        return False

    @property
    def oracle(self) -> BoxPrompt:
        """The reference it is measured against: the tight ground-truth box (evaluation only)."""
        return BoxPrompt()

    def make(self, mask: np.ndarray, rng: np.random.Generator, noisy: bool = True) -> PromptSet:
        raise ConfigError(_CANNOT_TRAIN)

    @property
    def unused_parameters(self) -> tuple[str, ...]:
        raise ConfigError(_CANNOT_TRAIN)

    def propose(self, prob: np.ndarray) -> PromptSet:
        """Boxes (original pixels, SAM's inclusive XYXY) and scores from a stage-1 probability map."""
        h, w = prob.shape
        n, labels, stats, _ = cv2.connectedComponentsWithStats((prob > self.threshold).astype(np.uint8),
                                                               connectivity=8)
        found = []
        for i in range(1, n):
            x, y, bw, bh, area = stats[i]
            if area < self.min_area * h * w:
                continue
            score = float(prob[labels == i].mean())
            if score < self.min_score:
                continue
            px, py = self.margin * bw + self.margin_px, self.margin * bh + self.margin_px
            found.append((score, [max(0.0, x - px), max(0.0, y - py), min(w - 1.0, x + bw - 1 + px),
                                  min(h - 1.0, y + bh - 1 + py)]))
        found = sorted(found, key=lambda t: -t[0])[:self.max_boxes]
        return PromptSet(boxes=np.asarray([b for _, b in found], np.float32).reshape(-1, 4),
                         scores=np.asarray([s for s, _ in found], np.float32))

    def label(self) -> str:
        return "auto" + (" (separate proposer)" if self.proposer else "")

    def describe(self) -> str:
        who = f"the proposer {self.proposer}" if self.proposer else "the same network"
        return (f"automatic, two stages: {who} segments with no prompt; components with mean probability >= "
                f"{self.min_score:g} covering >= {self.min_area:g} of the frame become boxes padded by "
                f"{self.margin:g} x side + {self.margin_px:g} px (at most {self.max_boxes}), each refined with a "
                "box prompt and merged; a frame with no proposal is a miss (empty mask)")
