"""No prompt: the mask decoder sees only the image, through the prompt encoder's empty path."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from polypsam.prompts.base import SINGLE_MASK_UNUSED, PromptSet, PromptType, register_prompt

# the empty prompt embeds no point and no box: no sparse token, the no-mask dense embedding only
NO_SPARSE_TOKENS = tuple(f"prompt_encoder.point_embeddings.{i}" for i in range(4)) + (
    "prompt_encoder.not_a_point_embed",)


@register_prompt("none")
@dataclass(frozen=True)
class NonePrompt(PromptType):
    """One prompt-free query per image, whatever its mask: a frame with no polyp is asked the same way."""

    seed: int = 0

    @property
    def prompt_free(self) -> bool:
        return True

    @property
    def needs_mask(self) -> bool:
        return False

    def make(self, mask: np.ndarray, rng: np.random.Generator, noisy: bool = True) -> PromptSet:
        return PromptSet(empty=True)

    @property
    def stochastic(self) -> bool:
        return False

    @property
    def unused_parameters(self) -> tuple[str, ...]:
        return SINGLE_MASK_UNUSED + NO_SPARSE_TOKENS

    def describe(self) -> str:
        return "no prompt (SAM's empty prompt: prompt-free segmentation)"
