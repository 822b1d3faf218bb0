"""Fast, memory-lean attention and gradient checkpointing for SAM's ViT image encoder and mask decoder.

Memory argument: stock ``segment_anything`` attention builds the full logits tensor
``(B*heads, N, N)``, adds the decomposed relative-position bias to it (more N x N temporaries) and
keeps the softmax for backward. For ViT-B at 1024 px each of the 4 global blocks sees N = 64*64 =
4096 tokens with 12 heads: 12 * 4096^2 * 4 B = 0.8 GB per image per block in fp32, about 3 GB saved
for backward over the 4 blocks. Here the bias is folded into q and k (below), so our code never
builds an N x N tensor and ``F.scaled_dot_product_attention`` can run a fused kernel that does not
either. The swap is by ``__class__`` so parameters, state_dict keys and checkpoints are unchanged.

The mask decoder's attention (a few prompt tokens against the 64 x 64 image tokens, both ways) has
no bias; on SDPA it drops the head-split copies and the separate scale and softmax passes, about 10%
of a decoder-only training step on the CPU.

Written by hand because no library patches SAM's encoder this way; the maths is exactly SAM's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import transformer as sam_transformer
from segment_anything.modeling.image_encoder import Attention, Block, get_rel_pos
from torch import nn
from torch.utils.checkpoint import checkpoint

from polypsam.models.sam_classes import sam_classes

__all__ = [
    "CheckpointedBlock",
    "SdpaAttention",
    "SdpaDecoderAttention",
    "enable_gradient_checkpointing",
    "use_sdpa_attention",
    "use_sdpa_decoder_attention",
    "use_stock_attention",
]

# q/k head dims are padded with zero columns to a multiple of this: CUDA's memory-efficient kernel
# needs q/k/v last dims divisible by its GEMM alignment (at most 8).
_ALIGN = 8


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _fold_rel_pos(
    q: torch.Tensor, k: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
    hw: tuple[int, int], scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return q', k' with q' @ k'^T == scale * q @ k^T + rel_h[..., :, None] + rel_w[..., None, :].

    q, k: (B, heads, h*w, C). rel_h[b, (i, j), kh] = q[b, (i, j)] . Rh[i, kh] is a per-query term
    that must land on every key in key-row kh, so q gets the columns [rel_h, rel_w] and k gets the
    one-hot columns [row(key) == kh, col(key) == kw]. Same terms as SAM's add_decomposed_rel_pos.
    """
    b, heads, n, c = q.shape
    h, w = hw
    rh = get_rel_pos(h, h, rel_pos_h)  # (h, h, C); interpolates if the table size differs
    rw = get_rel_pos(w, w, rel_pos_w)  # (w, w, C)
    r_q = q.reshape(b * heads, h, w, c)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh).reshape(b, heads, n, h).to(q.dtype)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw).reshape(b, heads, n, w).to(q.dtype)

    pad = _round_up(c + h + w, _ALIGN) - (c + h + w)
    eye_h = torch.eye(h, dtype=k.dtype, device=k.device).repeat_interleave(w, dim=0)  # key (i,j) -> i
    eye_w = torch.eye(w, dtype=k.dtype, device=k.device).repeat(h, 1)  # key (i,j) -> j
    k_extra = torch.cat([eye_h, eye_w, k.new_zeros(n, pad)], dim=-1).expand(b, heads, n, h + w + pad)
    q_fold = torch.cat([q * scale, rel_h, rel_w, q.new_zeros(b, heads, n, pad)], dim=-1)
    k_fold = torch.cat([k, k_extra], dim=-1)
    return q_fold, k_fold


class SdpaAttention(Attention):
    """SAM's ``Attention`` with the forward on ``F.scaled_dot_product_attention``.

    Kernel choice (checked against torch's sdp_utils): with the folded bias q/k have head dim
    C + h + w (ViT-B global: 64+64+64 = 192, windowed: 64+14+14 -> 96 after padding) while v keeps C.
    - CUDA: flash needs equal q/k/v dims, so it is skipped; the memory-efficient kernel accepts a
      different v dim (all dims divisible by 8) and runs, in fp32 and bf16/fp16 alike.
    - CPU: the flash kernel needs equal q/k/v dims, else torch falls back to the math path, which
      builds N x N. So on CPU v is zero-padded to the q/k dim and the output sliced: measured here,
      that is also faster than the math path for ViT-B's global blocks.
    No ``attn_mask`` is passed: an additive bias mask would itself be N x N.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        n = h * w
        # (3, B, heads, N, C)
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        c = v.shape[-1]
        if self.use_rel_pos:
            q, k = _fold_rel_pos(q, k, self.rel_pos_h, self.rel_pos_w, (h, w), self.scale)
            scale = 1.0
        else:
            scale = self.scale
        v_dim = q.shape[-1] if v.device.type == "cpu" else _round_up(c, _ALIGN)
        if v_dim != c:
            v = F.pad(v, (0, v_dim - c))
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)[..., :c]
        out = out.transpose(1, 2).reshape(b, h, w, -1)
        return self.proj(out)


def _swap(root: nn.Module, frm: type, to: type) -> int:
    """Set ``__class__`` of modules whose exact type is ``frm`` (not user subclasses) to ``to``.

    Returns how many modules have type ``to`` afterwards, so repeated calls return the same count.
    """
    if not isinstance(root, nn.Module):
        raise TypeError(f"expected a torch.nn.Module (e.g. sam.image_encoder), got {type(root).__name__}")
    count = 0
    for m in root.modules():
        if type(m) is frm:
            m.__class__ = to
        count += type(m) is to
    return count


def use_sdpa_attention(image_encoder: nn.Module) -> int:
    """Switch every stock SAM ``Attention`` in ``image_encoder`` to ``SdpaAttention``.

    Idempotent. Returns how many attention modules use SDPA afterwards (0 means the encoder is not
    SAM's ViT, e.g. LiteMedSAM's TinyViT, and nothing changed).
    """
    return _swap(image_encoder, Attention, SdpaAttention)


def use_stock_attention(image_encoder: nn.Module) -> int:
    """Switch back to the stock forward. Returns how many attention modules are stock afterwards."""
    return _swap(image_encoder, SdpaAttention, Attention)


class SdpaDecoderAttention(sam_transformer.Attention):
    """The mask decoder's ``Attention`` (TwoWayTransformer) on ``F.scaled_dot_product_attention``."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = self._separate_heads(self.q_proj(q), self.num_heads)
        k = self._separate_heads(self.k_proj(k), self.num_heads)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        # default scale 1/sqrt(C per head), as the stock forward
        return self.out_proj(self._recombine_heads(F.scaled_dot_product_attention(q, k, v)))


def _is_sam_decoder_attention(m: nn.Module) -> bool:
    """SAM's decoder ``Attention``, from segment_anything or a vendored copy (LiteMedSAM's)."""
    return type(m) in sam_classes("transformer", "Attention")  # exact: SdpaDecoderAttention subclasses it


def use_sdpa_decoder_attention(mask_decoder: nn.Module) -> int:
    """Switch the stock attention modules of a SAM mask decoder to ``SdpaDecoderAttention``.

    A vendored copy of the class has the same attributes, so its modules switch too. Idempotent;
    returns how many decoder attention modules use SDPA afterwards.
    """
    count = 0
    for m in mask_decoder.modules():
        if _is_sam_decoder_attention(m):
            m.__class__ = SdpaDecoderAttention
        count += type(m) is SdpaDecoderAttention
    return count


class CheckpointedBlock(Block):
    """SAM's ``Block`` that recomputes its activations in backward instead of storing them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return checkpoint(super().forward, x, use_reentrant=False)
        return super().forward(x)


def enable_gradient_checkpointing(image_encoder: nn.Module, enabled: bool = True) -> int:
    """Turn activation checkpointing of each ViT ``Block`` on (or off with ``enabled=False``).

    Only active while the encoder is in training mode with grad enabled. Idempotent; returns how many
    blocks are in the requested state afterwards.
    """
    if enabled:
        return _swap(image_encoder, Block, CheckpointedBlock)
    return _swap(image_encoder, CheckpointedBlock, Block)
