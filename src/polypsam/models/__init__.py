"""SAM-family models and prompt-free baselines behind one interface: build by name, know their preprocessing."""

from polypsam.models.registry import (
    ModelSpec,
    available_models,
    build_model,
    get_spec,
    register_model,
    takes_prompts,
)
from polypsam.models.sam import PromptableSAM

__all__ = ["ModelSpec", "PromptableSAM", "available_models", "build_model", "get_spec", "register_model",
           "takes_prompts"]
