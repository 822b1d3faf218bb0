import math

import numpy as np
import pytest
import torch

from polypsam.errors import ConfigError
from polypsam.training.losses import SegmentationLoss, soft_dice_loss
from polypsam.training.module import valid_region, warmup_cosine


def _pair():
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    good = (target * 2 - 1) * 20  # confident and right
    bad = -good
    return target, good, bad


def test_dice_loss_values():
    target, good, bad = _pair()
    valid = torch.ones_like(target)
    assert soft_dice_loss(good, target, valid) < 1e-3
    assert soft_dice_loss(bad, target, valid) > 0.9
    # half the polyp predicted: soft Dice 2*8/(8+16) (eps=1 smoothing)
    half = torch.full_like(target, -20.0)
    half[:, :, 2:4, 2:6] = 20
    assert soft_dice_loss(half, target, valid).item() == pytest.approx(1 - (2 * 8 + 1) / (8 + 16 + 1), abs=1e-4)


def test_padding_is_ignored():
    target, good, _ = _pair()
    logits = good.clone()
    logits[:, :, :, 6:] = 20  # confident "polyp" in the padded area
    valid = valid_region(torch.tensor([[8, 6], [8, 6]]), 8)
    assert soft_dice_loss(logits, target, valid) < 1e-3
    assert soft_dice_loss(logits, target, torch.ones_like(target)) > 0.3


@pytest.mark.parametrize("kind", SegmentationLoss.KINDS)
def test_every_loss_prefers_the_right_answer(kind):
    target, good, bad = _pair()
    valid = torch.ones_like(target)
    loss = SegmentationLoss(kind)
    assert loss(good, target, valid) < loss(bad, target, valid)
    g = good.clone().requires_grad_(True)
    loss(g * 0.1, target, valid).backward()
    assert torch.isfinite(g.grad).all() and g.grad.abs().sum() > 0


def test_unknown_loss():
    with pytest.raises(ConfigError, match="dice_bce"):
        SegmentationLoss("lovasz")


def test_warmup_then_cosine():
    total, warm = 200, 30
    f = [warmup_cosine(s, total, warm, 0.125, 0.25) for s in range(total + 1)]
    assert f[0] == 0.125 and f[warm] == pytest.approx(1.0)
    assert np.all(np.diff(f[:warm + 1]) > 0) and np.all(np.diff(f[warm:]) <= 1e-12)
    assert f[-1] == pytest.approx(0.25)
    mid = warm + (total - warm) // 2
    assert f[mid] == pytest.approx(0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi * 0.5)), abs=1e-9)
