"""LiteMedSAM zero-shot with ground-truth boxes on real polyp images.

This proves the real preprocessing (RGB, resize-longest-side, min-max, bottom-right pad), prompts and
weights are wired right: it reaches ~0.95 when they are, far less when any of them is off.
"""

import numpy as np
import pytest
import torch

from polypsam.data.datamodule import PolypDataModule
from polypsam.data.io import read_mask
from polypsam.inference import original_probabilities
from polypsam.metrics import dice_iou
from polypsam.models import build_model

pytestmark = pytest.mark.slow  # real data or several processes


def test_lite_zero_shot_dice_on_real_test_images(real_root):
    net = build_model("lite").eval()
    dm = PolypDataModule(root=str(real_root), image_size=net.spec.image_size, eval_batch_size=4, num_workers=0,
                         limit_test=8, resize_method=net.spec.resize_method)
    dm.setup("test")
    assert set(dm.test_sets) == {"Kvasir", "CVC-ClinicDB"}
    scores = {}
    for name, loader in zip(dm.test_sets, dm.test_dataloader()):
        dices = []
        for batch in loader:
            with torch.no_grad():
                logits, _ = net(batch.images, batch.input_hw, batch.prompts.boxes, batch.prompts.image_index)
            for j, (prob, gt) in enumerate(zip(original_probabilities(logits, batch.resizes), batch.masks_original)):
                assert np.array_equal(gt, read_mask(batch.mask_paths[j]))
                dices.append(dice_iou(prob.numpy() > 0.5, gt)[0])
        scores[name] = float(np.mean(dices))
        assert len(dices) == 8
    print("LiteMedSAM zero-shot Dice (8 images per set, original resolution):", scores)
    assert all(d >= 0.85 for d in scores.values()), scores
