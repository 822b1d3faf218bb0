"""CPU inference runtimes for the frozen image encoder: OpenVINO and ONNX Runtime beside torch.

Wherever the image encoder runs without gradients (the embedding-cache fill in training, evaluation,
prediction, both stages of ``prompt=auto``) a ``FrozenEncoder`` stands in for ``net.encode``: the torch
module itself, or the encoder exported once to ONNX (``runtime.store``) and run by another runtime
(``model.runtime``, ``model.runtime_precision``). Training with gradients stays in torch.
"""

from polypsam.runtime.encoder import FrozenEncoder, GraphEncoder, TorchEncoder, describe, embedding_model_key
from polypsam.runtime.registry import RUNTIMES, available_runtimes, build_frozen_encoder, resolve_runtime
from polypsam.runtime.settings import RuntimeSettings

__all__ = ["RUNTIMES", "FrozenEncoder", "GraphEncoder", "RuntimeSettings", "TorchEncoder", "available_runtimes",
           "build_frozen_encoder", "describe", "embedding_model_key", "resolve_runtime"]
