"""A SAM-family model (image encoder + prompt encoder + mask decoder) trained with box or point prompts.

SAM's own ``Sam.forward`` is decorated with ``@torch.no_grad()`` and its ``MaskDecoder.predict_masks``
repeats every image embedding once per prompt (``repeat_interleave``), which turns a batch of B images
with one box each into B*B decoder passes. This wrapper calls the submodules directly, gathers one
embedding per box and decodes all boxes of a batch in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from polypsam.models.frozen import tensor_digest
from polypsam.models.mask_head import is_stock_upscaling, mask_logits_channels_last, mask_logits_stock


@dataclass(frozen=True)
class ModelSpec:
    """What data preprocessing must know about a model."""

    name: str
    image_size: int  # square input side after resize-longest-side + pad
    pixel_mean: tuple[float, float, float]  # on the 0-255 scale (normalization == "mean_std")
    pixel_std: tuple[float, float, float]
    normalization: str  # "mean_std" (SAM) or "minmax" (LiteMedSAM: per-image min-max to [0, 1])
    embedding_size: int  # side of the image-embedding grid
    embedding_dim: int  # channels of the image embedding
    description: str = ""
    resize_method: str = "pil_bilinear"  # see polypsam.geometry.resize_image

    @property
    def low_res_size(self) -> int:
        return self.embedding_size * 4

    def preprocessing_key(self) -> str:
        """Everything about preprocessing that changes an embedding (cache keys)."""
        return (f"size={self.image_size};norm={self.normalization};mean={self.pixel_mean};"
                f"std={self.pixel_std};resize={self.resize_method}-longest-side;pad=bottom-right-zero")


class PromptableSAM(nn.Module):
    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module,
                 spec: ModelSpec):
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.spec = spec
        self.use_stock_mask_head(False)
        self.register_buffer("pixel_mean", torch.tensor(spec.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(spec.pixel_std).view(1, 3, 1, 1), persistent=False)

    def use_stock_mask_head(self, stock: bool = True) -> None:
        """segment_anything's NCHW mask head (comparisons), or the equivalent channels-last one (default).

        A decoder whose head is not SAM's layout always keeps the stock path.
        """
        fast = not stock and is_stock_upscaling(self.mask_decoder.output_upscaling)
        self._mask_logits = mask_logits_channels_last if fast else mask_logits_stock

    # -- preprocessing on the device ---------------------------------------------------------------
    def normalize(self, images: torch.Tensor, input_hw: torch.Tensor) -> torch.Tensor:
        return normalize_canvas(images, input_hw, self.spec.normalization, self.pixel_mean, self.pixel_std)

    # -- the three stages -------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, input_hw: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(self.normalize(images, input_hw))

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor | None, prompt_image_index: torch.Tensor,
               points: tuple[torch.Tensor, torch.Tensor] | None = None, prompt_free: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution mask logits (K,1,4h,4w) and predicted IoU (K,1) for K prompts.

        Inputs, all in the model's input frame:
          embeddings          (B, C, h, w) image embeddings
          boxes               (K, 4) XYXY, or None
          prompt_image_index  (K,) long: the image of the batch that prompt k belongs to
          points              ((K, P, 2) xy, (K, P) labels: 1 inside, 0 outside), or None
          prompt_free         (K,) bool: prompts decoded as the empty prompt whatever their box/point rows
                              hold, or None
        With neither boxes nor points each prompt is the prompt encoder's empty prompt (no sparse tokens,
        the no-mask dense embedding). Empty and box/point prompts have different token counts, so a batch
        holding both decodes in two passes.
        """
        if prompt_free is not None and bool(prompt_free.any()):
            if bool(prompt_free.all()):
                boxes = points = None
            else:
                return self._decode_two_kinds(embeddings, boxes, prompt_image_index, points, prompt_free)
        dec = self.mask_decoder
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=None)
        k = prompt_image_index.shape[0]
        if sparse.shape[0] != k:  # the empty prompt: one set of tokens for every prompt
            sparse, dense = sparse.expand(k, -1, -1), dense.expand(k, -1, -1, -1)
        if not (k == embeddings.shape[0] and torch.equal(
                prompt_image_index, torch.arange(k, device=prompt_image_index.device))):
            embeddings = embeddings.index_select(0, prompt_image_index)
        # channels-last: the transformer's flatten(2).permute(0, 2, 1) of the image tokens and their
        # positional encoding become views, and its output tokens are already the mask head's layout
        src = (embeddings + dense).contiguous(memory_format=torch.channels_last)  # promotes bf16 to fp32
        pos = self.prompt_encoder.get_dense_pe().contiguous(memory_format=torch.channels_last)
        out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(k, -1, -1), sparse], dim=1)
        _, c, h, w = src.shape
        hs, image_tokens = dec.transformer(src, pos.expand(k, -1, -1, -1), tokens)
        # Single-mask output is mask token 0 (SAM's multimask_output=False); tokens 1..3 are not decoded.
        hyper = dec.output_hypernetworks_mlps[0](hs[:, 1, :])
        logits = self._mask_logits(dec.output_upscaling, image_tokens.reshape(k, h, w, c), hyper)
        iou = dec.iou_prediction_head(hs[:, 0, :])[:, :1]
        return logits, iou

    def _decode_two_kinds(self, embeddings, boxes, prompt_image_index, points, prompt_free):
        """``decode`` of a batch mixing empty and box/point prompts: one pass per kind, in prompt order."""
        free = prompt_free.nonzero().flatten()
        held = (~prompt_free).nonzero().flatten()
        low_f, iou_f = self.decode(embeddings, None, prompt_image_index[free])
        low_h, iou_h = self.decode(embeddings, None if boxes is None else boxes[held], prompt_image_index[held],
                                   None if points is None else (points[0][held], points[1][held]))
        k = prompt_image_index.shape[0]
        logits = low_f.new_empty((k, *low_f.shape[1:])).index_copy(0, free, low_f).index_copy(0, held, low_h)
        iou = iou_f.new_empty((k, 1)).index_copy(0, free, iou_f).index_copy(0, held, iou_h)
        return logits, iou

    def forward(self, images: torch.Tensor | None, input_hw: torch.Tensor, boxes: torch.Tensor | None,
                prompt_image_index: torch.Tensor, embeddings: torch.Tensor | None = None,
                encoder_grad: bool = True, points: tuple[torch.Tensor, torch.Tensor] | None = None,
                prompt_free: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image mask logits on the input canvas (B,1,S,S) and predicted IoU per prompt (K,1).

        Inputs:
          images              (B, 3, S, S) uint8, resized and padded bottom-right (ignored with embeddings)
          input_hw            (B, 2) long: the resized image's size inside the canvas
          boxes, prompt_image_index, points, prompt_free: as ``decode``
          embeddings          (B, C, h, w) from the embedding cache, or None to run the image encoder
          encoder_grad        False: the image encoder runs without gradients
        The prompts of one image are merged by the max of their logits, the union of their masks at any
        threshold; an image without a prompt gets the lowest logit everywhere.
        """
        if embeddings is None:
            with torch.set_grad_enabled(encoder_grad and torch.is_grad_enabled()):
                embeddings = self.encode(images, input_hw)
        low, iou = self.decode(embeddings, boxes, prompt_image_index, points, prompt_free)
        return self.merge(low, prompt_image_index, embeddings.shape[0]), iou

    def merge(self, low: torch.Tensor, prompt_image_index: torch.Tensor, num_images: int) -> torch.Tensor:
        """``decode``'s per-prompt logits (K,1,4h,4w) -> per-image canvas logits (B,1,S,S): the max over each
        image's prompts, then bilinear to the canvas."""
        merged = merge_prompt_logits(low, prompt_image_index, num_images)
        s = self.spec.image_size
        if merged.shape[-1] != s:
            merged = F.interpolate(merged, size=(s, s), mode="bilinear", align_corners=False)
        return merged

    # -- identity -------------------------------------------------------------------------------
    def encoder_fingerprint(self) -> str:
        """A digest of the image encoder's weights and buffers and the preprocessing (the embedding-cache key)."""
        return encoder_fingerprint(self.image_encoder, self.spec)


def encoder_fingerprint(image_encoder: nn.Module, spec: ModelSpec) -> str:
    """What an image encoder computes from a canvas: its weights and buffers, the model and preprocessing."""
    state = sorted(image_encoder.state_dict().items())
    return tensor_digest((t for _, t in state), f"{spec.preprocessing_key()}{spec.name}")[:24]


def normalize_canvas(images: torch.Tensor, input_hw: torch.Tensor, normalization: str, mean: torch.Tensor,
                     std: torch.Tensor) -> torch.Tensor:
    """uint8 (B,3,S,S) resized+padded images -> normalised floats with a zero pad, as SAM does.

    SAM normalises the resized image and then pads with zeros; padding with 0 first and normalising after
    would turn the pad into -mean/std. We zero the pad after normalising. ``normalization``: ``mean_std``
    with (1,3,1,1) ``mean``/``std`` on the 0-255 scale, or ``minmax`` (per image, LiteMedSAM).
    """
    x = images.float()
    b, _, s, _ = x.shape
    ys = torch.arange(s, device=x.device).view(1, s, 1)
    xs = torch.arange(s, device=x.device).view(1, 1, s)
    valid = ((ys < input_hw[:, 0].view(b, 1, 1)) & (xs < input_hw[:, 1].view(b, 1, 1))).unsqueeze(1)
    if normalization == "minmax":
        big = torch.finfo(x.dtype).max
        lo = torch.where(valid, x, big).amin(dim=(1, 2, 3), keepdim=True)
        hi = torch.where(valid, x, -big).amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
    else:
        x = (x - mean) / std
    return x * valid


def merge_prompt_logits(logits: torch.Tensor, prompt_image_index: torch.Tensor, num_images: int) -> torch.Tensor:
    """Max over the prompts of each image; (K,1,H,W) -> (B,1,H,W). Fast path when K == B in order."""
    if logits.shape[0] == num_images and torch.equal(
            prompt_image_index, torch.arange(num_images, device=prompt_image_index.device)):
        return logits
    out = logits.new_full((num_images, *logits.shape[1:]), torch.finfo(logits.dtype).min)
    idx = prompt_image_index.view(-1, 1, 1, 1).expand_as(logits)
    return out.scatter_reduce(0, idx, logits, reduce="amax", include_self=True)
