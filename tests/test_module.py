"""The LightningModule's validation scores what evaluation reports: per-image Dice/IoU at the original size,
through the same inference path; and training runs with point prompts as with boxes."""

import lightning as L
import numpy as np
import pytest
import torch

from polypsam.data.datamodule import PolypDataModule
from polypsam.data.io import read_image, read_mask
from polypsam.inference import Predictor
from polypsam.metrics import dice_iou
from polypsam.models import build_model
from polypsam.models.freeze import STRATEGIES, freeze_strategy
from polypsam.prompts import seeded_rng
from polypsam.prompts.box import BoxPrompt
from polypsam.prompts.point import PointPrompt
from polypsam.training.module import PolypSAMModule


def _data(root, prompt, size):
    dm = PolypDataModule(root=str(root), image_size=size, batch_size=3, num_workers=0, prompt=prompt,
                         limit_val=3)
    dm.setup("fit")
    return dm


@pytest.mark.slow
@pytest.mark.parametrize("prompt", [BoxPrompt(), PointPrompt(num_positive=2, num_negative=1)], ids=str)
def test_validation_dice_is_the_evaluation_dice_at_original_size(small_root, prompt):
    net = build_model("tiny", pretrained=False)
    frozen = freeze_strategy(net, STRATEGIES["dec"], prompt.unused_parameters)
    module = PolypSAMModule(net, frozen_modules=frozen).eval()
    dm = _data(small_root, prompt, net.spec.image_size)
    batch = next(iter(dm.val_dataloader()))
    assert batch.masks_original is not None and batch.masks_original[0].shape == tuple(batch.original_hw[0].tolist())
    with torch.no_grad():
        module.validation_step(batch, 0)
    val_dice, val_iou = float(module.val_dice.compute()), float(module.val_iou.compute())
    # the same images, read from disk and prompted as evaluation prompts them, through the Predictor
    recs = dm.val_set.records[:len(batch)]
    masks = [read_mask(r.mask) for r in recs]
    prompts = [prompt.make(m, seeded_rng(prompt.seed, r.relpath), noisy=False) for m, r in zip(masks, recs)]
    preds = Predictor(net, "cpu")([read_image(r.image) for r in recs], prompts)
    scores = [dice_iou(p.prob > 0.5, m) for p, m in zip(preds, masks)]
    assert val_dice == pytest.approx(np.mean([d for d, _ in scores]), abs=1e-6)
    assert val_iou == pytest.approx(np.mean([i for _, i in scores]), abs=1e-6)
    # the canvas-resolution score differs: the two definitions are not the same number by accident
    assert all(m.shape != batch.masks.shape[-2:] for m in masks)


@pytest.mark.slow
def test_training_with_clicks_updates_the_decoder(small_root, tmp_path):
    prompt = PointPrompt(num_positive=3, num_negative=1)
    net = build_model("tiny", pretrained=False)
    frozen = freeze_strategy(net, STRATEGIES["dec"], prompt.unused_parameters)
    module = PolypSAMModule(net, lr=1e-3, frozen_modules=frozen)
    before = net.mask_decoder.output_hypernetworks_mlps[0].layers[0].weight.detach().clone()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path, limit_val_batches=1)
    trainer.fit(module, datamodule=_data(small_root, prompt, net.spec.image_size))
    after = net.mask_decoder.output_hypernetworks_mlps[0].layers[0].weight
    assert not torch.equal(before, after)
    assert 0.0 <= trainer.callback_metrics["val/dice"] <= 1.0
