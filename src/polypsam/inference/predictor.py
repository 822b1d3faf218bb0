"""``Predictor``: a network and its preprocessing spec, from images and prompts to probability maps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from polypsam.devices import autocast, resolve_device
from polypsam.geometry import Resize, resize_image, to_original
from polypsam.models.sam import ModelSpec, PromptableSAM
from polypsam.prompts import PromptSet, collate_prompts
from polypsam.runtime import FrozenEncoder, TorchEncoder


@dataclass
class Prediction:
    """One image's result.

    prob:    (H, W) float32 probability at the image's original resolution (all zero without a prompt)
    prompts: the prompts it was decoded from, in original-image pixels
    iou:     (K,) the decoder's predicted IoU of each prompt's mask
    """

    prob: np.ndarray
    prompts: PromptSet
    iou: np.ndarray


def preprocess(image: np.ndarray, spec: ModelSpec) -> tuple[torch.Tensor, Resize]:
    """RGB uint8 (H, W, 3) -> the (3, S, S) uint8 canvas the model takes, and the resize it records.

    Cheap and picklable: loader workers run it; normalisation happens on the device (``PromptableSAM``).
    """
    canvas, rz = resize_image(image, spec.image_size, spec.resize_method)
    return torch.from_numpy(canvas).permute(2, 0, 1).contiguous(), rz


def original_probabilities(logits: torch.Tensor, resizes: list[Resize]) -> list[torch.Tensor]:
    """(B, 1, S, S) canvas logits -> B (H, W) float32 probability maps at each image's original size.

    The one place that maps predictions back: the pad is cropped and the logits resized bilinearly
    before the sigmoid, as SAM's ``postprocess_masks`` does.
    """
    return [torch.sigmoid(to_original(logits[j, 0].float(), rz)) for j, rz in enumerate(resizes)]


class Predictor:
    """Batched inference with one network: ``encode`` once, ``decode`` any number of prompt sets.

    The network's ``spec`` fixes the preprocessing; ``device`` and ``precision`` follow ``polypsam.
    devices``. Images without a prompt get an all-zero map. ``encoder``: the runtime of the image encoder
    (``polypsam.runtime.build_frozen_encoder``); default torch's own, under ``precision``'s autocast.
    """

    def __init__(self, net: PromptableSAM, device: str | torch.device | None = "auto", precision: str = "32",
                 encoder: FrozenEncoder | None = None):
        self.device = resolve_device(device)
        self.net = net.to(self.device).eval()
        self.encoder = encoder or TorchEncoder(self.net)
        self.precision = str(precision)
        autocast(self.device, self.precision)  # a bad precision fails here, before any image is read

    @property
    def spec(self) -> ModelSpec:
        return self.net.spec

    @torch.inference_mode()
    def encode(self, canvases: torch.Tensor, resizes: list[Resize]) -> torch.Tensor:
        """(B, 3, S, S) uint8 canvases -> (B, C, h, w) image embeddings on the device."""
        hw = torch.tensor([rz.input_hw for rz in resizes], device=self.device)
        with autocast(self.device, self.precision):
            return self.encoder.encode(canvases.to(self.device, non_blocking=True), hw)

    @torch.inference_mode()
    def decode(self, embeddings: torch.Tensor, resizes: list[Resize], prompts: list[PromptSet]
               ) -> list[Prediction]:
        """Probability maps at the original size from embeddings and per-image prompts (original pixels).
        The network's forward: SAM, or a prompt-free baseline that ignores the prompts."""
        batch, pts, free = self._prompt_inputs(resizes, prompts)
        if batch is None:
            return self._maps(None, np.zeros(0, np.float32), np.zeros(0, np.int64), resizes, prompts)
        dev = self.device
        hw = torch.tensor([rz.input_hw for rz in resizes], device=dev)
        with autocast(dev, self.precision):
            logits, iou = self.net(None, hw, None if batch.boxes is None else batch.boxes.to(dev),
                                   batch.image_index.to(dev), embeddings=embeddings, points=pts, prompt_free=free)
        return self._maps(logits, iou.float().cpu().numpy()[:, 0], batch.image_index.numpy(), resizes, prompts)

    def _prompt_inputs(self, resizes: list[Resize], prompts: list[PromptSet]):
        """The prompts in the input frame, collated, with points and the prompt-free flags on the device;
        (None, None, None) when no image has a prompt."""
        batch = collate_prompts([p.to_input(rz) for p, rz in zip(prompts, resizes)])
        if len(batch) == 0:
            return None, None, None
        dev = self.device
        pts = None if batch.points is None else (batch.points.to(dev), batch.point_labels.to(dev))
        free = None if batch.prompt_free is None else batch.prompt_free.to(dev)
        return batch, pts, free

    @torch.inference_mode()
    def prompt_logits(self, embeddings: torch.Tensor, resizes: list[Resize], prompts: list[PromptSet]
                      ) -> tuple[torch.Tensor | None, np.ndarray, np.ndarray]:
        """The decoder's output per prompt: low-resolution logits (K,1,4h,4w) (None when K = 0), predicted
        IoU (K,) and the image each prompt belongs to (K,), prompts in image order."""
        batch, pts, free = self._prompt_inputs(resizes, prompts)
        if batch is None:
            return None, np.zeros(0, np.float32), np.zeros(0, np.int64)
        dev = self.device
        with autocast(dev, self.precision):
            low, iou = self.net.decode(embeddings, None if batch.boxes is None else batch.boxes.to(dev),
                                       batch.image_index.to(dev), points=pts, prompt_free=free)
        return low, iou.float().cpu().numpy()[:, 0], batch.image_index.numpy()

    @torch.inference_mode()
    def assemble(self, low: torch.Tensor | None, iou: np.ndarray, index: np.ndarray, resizes: list[Resize],
                 prompts: list[PromptSet]) -> list[Prediction]:
        """Per image: its prompts' logits merged (``PromptableSAM.merge``), mapped to the original size."""
        logits = None
        if low is not None:
            with autocast(self.device, self.precision):
                logits = self.net.merge(low, torch.from_numpy(index).to(low.device), len(resizes))
        return self._maps(logits, iou, index, resizes, prompts)

    @staticmethod
    def _maps(logits: torch.Tensor | None, iou: np.ndarray, index: np.ndarray, resizes: list[Resize],
              prompts: list[PromptSet]) -> list[Prediction]:
        """(B,1,S,S) canvas logits -> one ``Prediction`` per image (all zero without a prompt)."""
        if logits is None:
            return [Prediction(np.zeros(rz.original_hw, np.float32), p, np.zeros(0, np.float32))
                    for p, rz in zip(prompts, resizes)]
        probs = original_probabilities(logits, resizes)
        out = []
        for j, (p, rz) in enumerate(zip(prompts, resizes)):
            prob = probs[j].cpu().numpy() if len(p) else np.zeros(rz.original_hw, np.float32)
            out.append(Prediction(prob, p, iou[index == j]))
        return out

    def predict(self, canvases: torch.Tensor, resizes: list[Resize], prompts: list[PromptSet]
                ) -> list[Prediction]:
        return self.decode(self.encode(canvases, resizes), resizes, prompts)

    def __call__(self, images: list[np.ndarray], prompts: list[PromptSet]) -> list[Prediction]:
        """Convenience for a few in-memory RGB images; loops over folders use ``ImageItems`` instead."""
        pre = [preprocess(im, self.spec) for im in images]
        return self.predict(torch.stack([c for c, _ in pre]), [rz for _, rz in pre], prompts)
