"""Prompt types, one module each, registered by name: ``prompt=<name>`` in train, evaluate and predict.

Adding a type is one module here plus one yaml under ``conf/prompt/``: every module of this package is
imported below, so its ``@register_prompt`` runs.
"""

import importlib
import pkgutil

from polypsam.prompts.base import (
    PromptBatch,
    PromptSet,
    PromptType,
    available_prompts,
    build_prompt,
    collate_prompts,
    prompt_config,
    register_prompt,
    seeded_rng,
)

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["PromptBatch", "PromptSet", "PromptType", "available_prompts", "build_prompt", "collate_prompts",
           "prompt_config", "register_prompt", "seeded_rng"]
