"""Box prompts: the tight box around the mask (the paper), or one box per connected component."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from polypsam.errors import ConfigError
from polypsam.geometry import box_from_mask, boxes_per_component, jitter_boxes
from polypsam.prompts.base import SINGLE_MASK_UNUSED, PromptSet, PromptType, register_prompt

MODES = ("tight", "per_component")


@register_prompt("box")
@dataclass(frozen=True)
class BoxPrompt(PromptType):
    """mode: ``tight`` (one box around all foreground) or ``per_component`` (one per polyp, merged).

    min_area: mask components smaller than this (px) are ignored by both modes (the largest one is kept
    when all are smaller); 0 is the paper's literal tight box around every foreground pixel.
    jitter_px / jitter_frac: noise, each side moves by U(-j, j) with j = jitter_px + jitter_frac x side.
    seed: the evaluation draw of jittered boxes (training draws per worker and epoch).
    """

    mode: str = "tight"
    min_area: int = 0
    jitter_px: float = 0.0
    jitter_frac: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"prompt.mode={self.mode!r}: choose one of {', '.join(MODES)}.")
        if not 0.0 <= self.jitter_frac <= 1.0 or self.jitter_px < 0 or self.min_area < 0:
            raise ConfigError(f"prompt: jitter_frac={self.jitter_frac} must lie in [0, 1], jitter_px="
                              f"{self.jitter_px} and min_area={self.min_area} must be >= 0.")

    def boxes(self, mask: np.ndarray) -> np.ndarray:
        if self.mode == "per_component":
            return boxes_per_component(mask, self.min_area)
        if self.min_area > 0:  # the tight box around the components that count
            comps = boxes_per_component(mask, self.min_area)
            if len(comps) == 0:
                return comps
            return np.array([[comps[:, 0].min(), comps[:, 1].min(), comps[:, 2].max(), comps[:, 3].max()]],
                            np.float32)
        b = box_from_mask(mask)
        return np.zeros((0, 4), np.float32) if b is None else b[None]

    def make(self, mask: np.ndarray, rng: np.random.Generator, noisy: bool = True) -> PromptSet:
        boxes = self.boxes(mask)
        if noisy:
            boxes = jitter_boxes(boxes, mask.shape, rng, self.jitter_px, self.jitter_frac)
        return PromptSet(boxes=boxes)

    @property
    def unused_parameters(self) -> tuple[str, ...]:
        # boxes use point_embeddings 2 and 3 (the corners); clicks and padding points are never embedded
        return SINGLE_MASK_UNUSED + ("prompt_encoder.point_embeddings.0", "prompt_encoder.point_embeddings.1",
                                     "prompt_encoder.not_a_point_embed")

    @property
    def stochastic(self) -> bool:
        return self.jitter_px > 0 or self.jitter_frac > 0

    @property
    def noise(self) -> float:
        return self.jitter_frac

    def with_noise(self, level: float) -> BoxPrompt:
        return dataclasses.replace(self, jitter_frac=float(level))

    def label(self) -> str:
        parts = ["box"] + (["per_component"] if self.mode == "per_component" else [])
        parts += [f"min_area {self.min_area}"] if self.min_area else []
        parts += [f"jitter {self.jitter_frac:g}"] if self.jitter_frac else []
        parts += [f"jitter {self.jitter_px:g}px"] if self.jitter_px else []
        return " ".join(parts)

    def describe(self) -> str:
        where = ("one box per connected component" if self.mode == "per_component"
                 else "tight box around the ground truth (oracle)")
        specks = f", components under {self.min_area} px ignored" if self.min_area else ""
        noise = ""
        if self.jitter_frac or self.jitter_px:
            noise = (f", jittered (each side +-{self.jitter_px:g} px +-{self.jitter_frac:g} x box side, "
                     f"seed {self.seed})")
        return where + specks + noise
