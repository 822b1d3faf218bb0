"""Segmentation losses on mask logits, computed per image over the valid (unpadded) region."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from polypsam.errors import ConfigError


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per image, averaged over the batch (MONAI DiceLoss(sigmoid=True) with batch=False)."""
    p = torch.sigmoid(logits.float()) * valid
    t = target.float()
    dims = tuple(range(1, p.ndim))
    inter = (p * t).sum(dims)
    return (1.0 - (2.0 * inter + eps) / (p.sum(dims) + t.sum(dims) + eps)).mean()


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(1, x.ndim))
    return ((x * valid).sum(dims) / valid.sum(dims).clamp_min(1)).mean()


def bce_loss(logits, target, valid):
    return _masked_mean(F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none"), valid)


def focal_loss(logits, target, valid):
    return _masked_mean(sigmoid_focal_loss(logits.float(), target.float(), alpha=0.25, gamma=2.0,
                                           reduction="none"), valid)


class SegmentationLoss(torch.nn.Module):
    """``dice`` (the paper), ``dice_bce`` (Dice + BCE, as MedSAM) or ``focal_dice`` (20:1, as SAM)."""

    KINDS = ("dice", "dice_bce", "focal_dice")

    def __init__(self, kind: str = "dice"):
        super().__init__()
        if kind not in self.KINDS:
            raise ConfigError(f"loss={kind!r}: choose one of {', '.join(self.KINDS)}.")
        self.kind = kind

    def forward(self, logits, target, valid):
        dice = soft_dice_loss(logits, target, valid)
        if self.kind == "dice":
            return dice
        if self.kind == "dice_bce":
            return dice + bce_loss(logits, target, valid)
        return 20.0 * focal_loss(logits, target, valid) + dice
