"""Training sees what evaluation sees: real LiteMedSAM (TinyViT, 27 BatchNorm layers) through a real fit.

The embeddings that training serves to the decoder, computed in epoch 0 or read from the cache in epoch 1,
equal the single-image embeddings that evaluation computes (to the cache's fp16), so they cannot depend
on the other images of a batch; and the first batch's training loss, before any optimiser step, is the
eval-mode loss of that batch. A resume whose checkpoint holds a moved BatchNorm statistic is refused.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from polypsam.config import CONF_DIR
from polypsam.data.io import read_image
from polypsam.errors import FrozenStateChanged
from polypsam.inference.predictor import Predictor, preprocess
from polypsam.models import build_model
from polypsam.models.freeze import STRATEGIES, freeze_strategy
from polypsam.prompts.box import BoxPrompt
from polypsam.train import train
from polypsam.training.module import PolypSAMModule

pytestmark = pytest.mark.slow  # real data and the real encoder


class ServedEmbeddings(L.Callback):
    """The image embeddings each training batch hands the mask decoder, by image key and epoch, and the first
    batch with its loss (one tight box per image: prompt k is image k)."""

    last: ServedEmbeddings | None = None

    def __init__(self):
        self.served: dict[tuple[int, str], torch.Tensor] = {}
        self.first: tuple | None = None
        self.keys: list[str] = []
        self.epoch = 0
        ServedEmbeddings.last = self

    def on_fit_start(self, trainer, pl_module):
        net = pl_module.net
        # the decoder's transformer gets embeddings + the no-mask dense prompt: subtract it again
        net.mask_decoder.transformer.register_forward_pre_hook(
            lambda mod, args: self._record(args[0] - net.prompt_encoder.no_mask_embed.weight.view(1, -1, 1, 1)))

    def _record(self, emb):
        if self.keys:
            for k, e in zip(self.keys, emb.detach()):
                self.served[(self.epoch, k)] = e.clone()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys, self.epoch = list(batch.keys), trainer.current_epoch
        if self.first is None:
            self.first = (batch, None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.keys = []
        if self.first[1] is None:
            self.first = (batch, float(outputs["loss"]))


def test_training_serves_the_embeddings_evaluation_computes(small_root, tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[
            # fp32: the first batch's loss is compared with an fp32 eval-mode step (bf16 training, which
            # precision=auto picks on a CPU with AMX, is covered by test_frozen's cache test)
            "+experiment=dec_lite", "trainer.precision=32", f"data.root={small_root}", "data.num_workers=0",
            "data.limit_train=5", "data.limit_val=1", "scratch.batch_size=4",
            "scratch.effective_batch_size=4", "scratch.max_epochs=2", "validate_before_training=false",
            "test_after_training=false", "callbacks.rich_progress_bar=null", "callbacks.val_overlays=null",
            f"paths.root_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}",
            f"paths.output_dir={tmp_path / 'run'}", "+callbacks.served._target_=test_frozen_real.ServedEmbeddings"])
    train(cfg)
    probe = ServedEmbeddings.last
    keys = {k for _, k in probe.served}
    assert len(keys) == 5 and len(probe.served) == 10  # 5 training images (a full batch and one more), epochs 0 and 1

    net = build_model("lite")
    predictor = Predictor(net, "cpu")
    batch, loss = probe.first
    paths = dict(zip(batch.keys, batch.image_paths))
    for key, path in paths.items():
        canvas, rz = preprocess(read_image(path), net.spec)
        alone = predictor.encode(canvas[None], [rz])[0]  # evaluation's encoder call, one image per batch
        scale = alone.abs().max()
        for epoch in (0, 1):
            assert (probe.served[(epoch, key)] - alone).abs().max() <= 2e-3 * scale, (key, epoch)

    # the first batch's loss before any optimiser step: the eval-mode loss of a fresh pretrained model
    fresh = build_model("lite")
    frozen = freeze_strategy(fresh, STRATEGIES["dec"], BoxPrompt().unused_parameters)
    module = PolypSAMModule(fresh, loss=cfg.loss, frozen_modules=frozen).eval()
    with torch.no_grad():
        expected, _ = module._step(batch)
    assert loss == pytest.approx(float(expected), rel=1e-4, abs=1e-6)


def test_a_resume_whose_frozen_batchnorm_moved_is_refused(small_root, tmp_path):
    """One short dec epoch (2 images), then last.ckpt with TinyViT's first BatchNorm mean moved by 0.5."""
    def cfg(*extra):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("train", overrides=[
                "+experiment=dec_lite", "trainer.precision=32", "model.runtime=torch", f"data.root={small_root}",
                "data.num_workers=0", "data.limit_train=2", "data.limit_val=1", "scratch.batch_size=2",
                "scratch.effective_batch_size=2", "validate_before_training=false", "test_after_training=false",
                "callbacks.rich_progress_bar=null", "callbacks.val_overlays=null", f"paths.root_dir={tmp_path}",
                f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path / 'run'}", *extra])

    train(cfg("scratch.max_epochs=1"))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    ckpt["state_dict"]["net.image_encoder.patch_embed.seq.0.bn.running_mean"].add_(0.5)
    torch.save(ckpt, tmp_path / "moved.ckpt")
    with pytest.raises(FrozenStateChanged, match=r"moved\.ckpt: frozen part 'image_encoder' differs from the "
                       r"weights this run was built with \(image_encoder\.patch_embed\.seq\.0\.bn\.running_mean\)"):
        train(cfg("scratch.max_epochs=2", f"ckpt_path={tmp_path / 'moved.ckpt'}"))
