"""``FrozenEncoder``: what ``net.encode`` returns under ``torch.no_grad()``, from torch or an exported graph."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from polypsam.models.sam import PromptableSAM, normalize_canvas

EXACT_PRECISION = "fp32"


def embedding_model_key(fingerprint: str, runtime: str, precision: str) -> str:
    """The embedding-cache folder of an encoder: exact (fp32) runtimes share torch's, ``<fingerprint>``;
    reduced precision gets its own, ``<fingerprint>-<runtime>-<precision>``, never mixed with exact entries."""
    if precision == EXACT_PRECISION:
        return fingerprint
    return f"{fingerprint}-{runtime}-{precision}"


class FrozenEncoder(Protocol):
    """``encode(images, input_hw)``: (B,3,S,S) uint8 canvases and (B,2) sizes -> (B,C,h,w) fp32 embeddings,
    on the images' device, without gradients."""

    runtime: str
    precision: str
    fallback: str  # why the runtime or precision asked for did not run ("" when it did)

    def encode(self, images: torch.Tensor, input_hw: torch.Tensor) -> torch.Tensor: ...

    def model_key(self) -> str: ...


def describe(encoder: FrozenEncoder) -> str:
    """``<runtime> <precision>`` of an encoder as built, e.g. ``openvino fp32``: what the records call it."""
    return f"{encoder.runtime} {encoder.precision}"


class TorchEncoder:
    """The network's own encoder: its device, its modes (a frozen encoder is kept in eval mode by its owner)."""

    runtime, precision = "torch", EXACT_PRECISION

    def __init__(self, net: PromptableSAM, fallback: str = ""):
        self.net, self.fallback = net, fallback

    def encode(self, images: torch.Tensor, input_hw: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.net.encode(images, input_hw)

    def model_key(self) -> str:
        return embedding_model_key(self.net.encoder_fingerprint(), self.runtime, self.precision)

    def __repr__(self) -> str:
        return "TorchEncoder()"


class GraphEncoder:
    """The image encoder as an exported graph, one image per call (the export has a batch of one).

    ``infer`` maps a (1,3,S,S) float32 array of normalised pixels to the (1,C,h,w) embedding at ``precision``
    (what the runtime compiled, not what was asked); the normalisation (``normalize_canvas``, a few
    milliseconds) stays in torch. The fingerprint is the network's at export time: the encoder is frozen,
    so it cannot change afterwards.
    """

    def __init__(self, net: PromptableSAM, infer: Callable[[np.ndarray], np.ndarray], runtime: str,
                 precision: str, fingerprint: str, fallback: str = ""):
        self.spec, self.infer = net.spec, infer
        self.runtime, self.precision, self.fingerprint, self.fallback = runtime, precision, fingerprint, fallback
        self.mean, self.std = net.pixel_mean.detach().cpu(), net.pixel_std.detach().cpu()

    def encode(self, images: torch.Tensor, input_hw: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = normalize_canvas(images.cpu(), input_hw.cpu(), self.spec.normalization, self.mean, self.std)
        arrays = x.numpy()
        out = np.concatenate([self.infer(arrays[i:i + 1]) for i in range(len(arrays))])
        return torch.from_numpy(out).to(images.device)

    def model_key(self) -> str:
        return embedding_model_key(self.fingerprint, self.runtime, self.precision)

    def __repr__(self) -> str:
        return f"GraphEncoder({self.runtime}, {self.precision})"
