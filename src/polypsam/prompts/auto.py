"""Automatic prompts, two stages: a prompt-free pass proposes boxes, a box-prompted pass refines each.

This module holds the settings, the proposal geometry (probability map -> components -> padded boxes)
and the keeping rule on scores; ``inference.auto`` runs the two passes and computes the scores that need
stage 2's masks.
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
SCORES = ("mean_prob", "agreement", "prob_x_agreement", "iou_head")
KEEPS = ("all", "clear")
# the settings a selection file (python -m polypsam.select_auto) carries: all but where they come from
TUNED = ("threshold", "min_score", "min_area", "margin", "margin_px", "max_boxes", "score", "keep",
         "clear_margin", "final_score", "rebox", "blend")
MAX_REBOX = 3


@dataclass(frozen=True)
class Components:
    """Stage-1 foreground components of one frame at one threshold: ``labels`` (H, W) int32, 0 the
    background; per label, ``stats`` (x, y, w, h, area) as OpenCV gives them and its mean probability."""

    labels: np.ndarray
    stats: np.ndarray
    mean_prob: np.ndarray


@dataclass(frozen=True)
class Proposals:
    """The proposals of one frame, best mean probability first: component ``ids`` (labels), padded
    ``boxes`` (K, 4) in original pixels (SAM's inclusive XYXY) and ``mean_prob`` (K,)."""

    ids: np.ndarray
    boxes: np.ndarray
    mean_prob: np.ndarray


@register_prompt("auto")
@dataclass(frozen=True)
class AutoPrompt(PromptType):
    """proposer: a checkpoint for stage 1 that reads the refiner's canvas (input size and resize): a SAM
    trained with prompt=mixed or none, or a prompt-free baseline such as the U-Net; None: the evaluated or
    predicted network proposes for itself.
    settings: a file of settings chosen on validation (``python -m polypsam.select_auto``) that replaces
      the ones below; auto: ``<checkpoint stem>.auto.json`` beside the checkpoint when there is one; None:
      these settings as they are. A ``prompt.<key>=`` given on the command line wins over the file.

    threshold: stage-1 probability above which a pixel is foreground.
    min_score: a component is proposed when its mean stage-1 probability reaches this.
    min_area: ... and when it covers at least this fraction of the frame (specular highlights are small).
    margin / margin_px: each side of a proposed box moves out by margin x its side + margin_px, because
      a box-prompted SAM expects a box around the polyp, not inside it.
    max_boxes: proposals per frame (best mean probability first); stage 2 scores these.
    score: how a proposal is ranked and kept. mean_prob: its mean stage-1 probability; agreement: IoU of
      its stage-2 mask (its box alone, thresholded at 0.5) with the stage-1 component it came from (a
      highlight's box grows into something else); prob_x_agreement: the product; iou_head: SAM's
      predicted IoU of its stage-2 mask. All but mean_prob decode each proposal on its own first.
    keep: all: every proposal (up to max_boxes); clear: the best alone when its score exceeds the
      runner-up's by clear_margin or more (most frames hold one polyp), else all.
    final_score: after scoring, proposals under this score are dropped (0: none); a frame left with
      none is a miss, recorded with an empty mask.
    rebox: box -> mask -> box rounds after keeping: each kept box is replaced by the tight box of its own
      stage-2 mask (unchanged when that mask is empty), then the set is decoded again. A padded stage-1
      box is loose, and a box-prompted SAM is trained on tight boxes (0: the kept boxes as they are).
    blend: with a separate proposer, stage 1's probability is blend x the proposer's + (1 - blend) x the
      refiner's own prompt-free probability: an ensemble of two networks that err differently (1: the
      proposer alone; without a proposer it changes nothing).
    """

    proposer: str | None = None
    settings: str | None = "auto"
    threshold: float = 0.5
    min_score: float = 0.6
    min_area: float = 0.002
    margin: float = 0.1
    margin_px: float = 4.0
    max_boxes: int = 3
    score: str = "mean_prob"
    keep: str = "all"
    clear_margin: float = 0.2
    final_score: float = 0.0
    rebox: int = 0
    blend: float = 1.0
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
        if self.score not in SCORES or self.keep not in KEEPS:
            raise ConfigError(f"prompt=auto: score={self.score!r} and keep={self.keep!r}: choose score from "
                              f"{', '.join(SCORES)} and keep from {', '.join(KEEPS)}.")
        if not (0 <= self.clear_margin <= 1 and 0 <= self.final_score <= 1):
            raise ConfigError(f"prompt=auto: clear_margin={self.clear_margin} and final_score={self.final_score} "
                              "must lie in [0, 1] (scores are fractions).")
        if not 0 <= self.blend <= 1:
            raise ConfigError(f"prompt=auto: blend={self.blend} must lie in [0, 1] (the proposer's share of stage 1).")
        if not (isinstance(self.rebox, int) and 0 <= self.rebox <= MAX_REBOX):
            raise ConfigError(f"prompt=auto: rebox={self.rebox!r} must be a whole number of box -> mask -> box "
                              f"rounds from 0 to {MAX_REBOX}.")

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

    # -- stage 1: geometry -------------------------------------------------------------------------
    def components(self, prob: np.ndarray) -> Components:
        n, labels, stats, _ = cv2.connectedComponentsWithStats((prob > self.threshold).astype(np.uint8),
                                                               connectivity=8)
        sums = np.bincount(labels.ravel(), weights=prob.ravel(), minlength=n)
        return Components(labels, stats, sums / np.maximum(stats[:, 4], 1))

    def proposals(self, comps: Components) -> Proposals:
        """Components large and confident enough, as padded boxes, best mean probability first."""
        h, w = comps.labels.shape
        ids = np.arange(1, len(comps.stats))
        ok = (comps.stats[ids, 4] >= self.min_area * h * w) & (comps.mean_prob[ids] >= self.min_score)
        ids = ids[ok]
        ids = ids[np.argsort(-comps.mean_prob[ids], kind="stable")][:self.max_boxes]
        x, y, bw, bh = (comps.stats[ids, k].astype(np.float64) for k in range(4))
        px, py = self.margin * bw + self.margin_px, self.margin * bh + self.margin_px
        boxes = np.stack([np.maximum(0.0, x - px), np.maximum(0.0, y - py), np.minimum(w - 1.0, x + bw - 1 + px),
                          np.minimum(h - 1.0, y + bh - 1 + py)], axis=1)
        return Proposals(ids, boxes.astype(np.float32).reshape(-1, 4), comps.mean_prob[ids].astype(np.float32))

    def propose(self, prob: np.ndarray) -> PromptSet:
        """Boxes and their mean probabilities from a stage-1 probability map (before any stage-2 scoring)."""
        p = self.proposals(self.components(prob))
        return PromptSet(boxes=p.boxes, scores=p.mean_prob)

    # -- scoring and keeping -----------------------------------------------------------------------
    @property
    def scores_after_refinement(self) -> bool:
        """Whether the score needs each proposal decoded on its own by stage 2."""
        return self.score != "mean_prob"

    def combine(self, mean_prob: np.ndarray, agreement: np.ndarray | None, iou: np.ndarray | None) -> np.ndarray:
        """The ``score`` of each proposal from its parts (agreement and iou: None for mean_prob)."""
        by_name = {"mean_prob": lambda: mean_prob, "agreement": lambda: agreement,
                   "prob_x_agreement": lambda: mean_prob * agreement, "iou_head": lambda: iou}
        return np.asarray(by_name[self.score](), np.float32)

    def kept(self, scores: np.ndarray) -> np.ndarray:
        """Indices of the proposals kept, best score first (``keep``, then ``final_score``)."""
        order = np.argsort(-scores, kind="stable")[:self.max_boxes]
        if self.keep == "clear" and len(order) > 1 and scores[order[0]] - scores[order[1]] >= self.clear_margin:
            order = order[:1]
        return order[scores[order] >= self.final_score]

    def label(self) -> str:
        return "auto" + (" (separate proposer)" if self.proposer else "")

    def describe(self) -> str:
        who = f"the proposer {self.proposer}" if self.proposer else "the same network"
        if self.proposer and self.blend == 0:
            who = "the same network (the proposer's map has weight 0)"
        elif self.proposer and self.blend < 1:
            who = f"{who} (weight {self.blend:g}) averaged with the refiner itself"
        keep = (f"the best alone when it leads the runner-up by {self.clear_margin:g}, else all" if self.keep == "clear"
                else "all")
        return (f"automatic, two stages: {who} segments with no prompt; components with mean probability >= "
                f"{self.min_score:g} covering >= {self.min_area:g} of the frame become boxes padded by "
                f"{self.margin:g} x side + {self.margin_px:g} px (at most {self.max_boxes}), scored by "
                f"{self.score}; kept: {keep}, scoring >= {self.final_score:g}; each refined with a box prompt"
                + (f", re-boxed from its own mask {self.rebox} time(s)," if self.rebox else "")
                + " and merged; a frame with no proposal is a miss (empty mask)")
