"""SAM-family models behind one interface: build by name, know their preprocessing."""

from polypsam.models.registry import ModelSpec, available_models, build_model, get_spec, register_model
from polypsam.models.sam import PromptableSAM

__all__ = ["ModelSpec", "PromptableSAM", "available_models", "build_model", "get_spec", "register_model"]
