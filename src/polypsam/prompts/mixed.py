"""Mixed-prompt training: each sample draws its prompt type, so one checkpoint both proposes and refines.

SAM 2's trainer mixes clicks and boxes per object the same way. Validation and evaluation use one
option, ``validate``, without its training noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from polypsam.errors import ConfigError
from polypsam.prompts.base import PromptSet, PromptType, build_prompt, register_prompt


def _default_options() -> dict[str, dict[str, Any]]:
    return {"none": {"p": 0.5}, "box": {"p": 0.5, "jitter_frac": 0.1}}


@register_prompt("mixed")
@dataclass(frozen=True)
class MixedPrompt(PromptType):
    """options: ``{type: {p: probability, <that type's settings>}}``; the probabilities sum to 1.

    validate: the option that validation (``best.ckpt``) and evaluation use, without noise.
    """

    options: Mapping[str, Mapping[str, Any]] = field(default_factory=_default_options)
    validate: str = "none"
    seed: int = 0

    def __post_init__(self):
        if not self.options:
            raise ConfigError("prompt=mixed: prompt.options is empty; give e.g. {none: {p: 0.5}, box: {p: 0.5}}.")
        if self.validate not in self.options:
            raise ConfigError(f"prompt.validate={self.validate!r}: choose one of the options "
                              f"({', '.join(self.options)}).")
        probs = {k: float(dict(o).get("p", 0.0)) for k, o in self.options.items()}
        if abs(sum(probs.values()) - 1.0) > 1e-6 or min(probs.values()) <= 0:
            got = ", ".join(f"{k}: {v:g}" for k, v in probs.items())
            raise ConfigError(f"prompt=mixed: every option needs p > 0 and the p's must sum to 1 (got {got}).")
        for prompt, _ in self.choices:
            if prompt.from_model or isinstance(prompt, MixedPrompt):
                raise ConfigError(f"prompt=mixed: option {prompt.name!r} cannot be drawn per sample; "
                                  "mix types that derive prompts from the mask (none, box, point).")

    @cached_property
    def choices(self) -> tuple[tuple[PromptType, float], ...]:
        out = []
        for kind, opts in self.options.items():
            settings = {k: v for k, v in dict(opts).items() if k != "p"}
            out.append((build_prompt({"type": kind, **settings}), float(dict(opts)["p"])))
        return tuple(out)

    @cached_property
    def validation_prompt(self) -> PromptType:
        return dict(zip(self.options, (p for p, _ in self.choices)))[self.validate].without_noise()

    @property
    def prompt_free(self) -> bool:
        return any(p.prompt_free for p, _ in self.choices)

    def make(self, mask: np.ndarray, rng: np.random.Generator, noisy: bool = True) -> PromptSet:
        if not noisy:
            return self.validation_prompt.make(mask, rng, noisy=False)
        prompts, probs = zip(*self.choices)
        return prompts[int(rng.choice(len(prompts), p=np.asarray(probs) / sum(probs)))].make(mask, rng, noisy=True)

    @property
    def unused_parameters(self) -> tuple[str, ...]:
        """What no option reaches: frozen parameters must get no gradient from any of them."""
        first, *rest = (p.unused_parameters for p, _ in self.choices)
        return tuple(n for n in first if all(n in r for r in rest))

    def without_noise(self) -> PromptType:
        return self.validation_prompt

    def label(self) -> str:
        return "mixed " + " / ".join(f"{p.label()} {w:g}" for p, w in self.choices)

    def describe(self) -> str:
        parts = "; ".join(f"{p.describe()} with p={w:g}" for p, w in self.choices)
        return f"mixed per sample in training ({parts}); validated with {self.validation_prompt.describe()}"
