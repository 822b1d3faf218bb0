"""Frozen means frozen, through a real ``Trainer.fit`` (Hydra composition, ``polypsam.train.train``).

Lightning 2.6 never calls ``LightningModule.train()`` in fit: a check that calls it by hand proves nothing.
These tests watch every forward call of every module while Lightning trains, on ``tiny_bn`` (a tiny SAM
whose image encoder starts with BatchNorm and dropout, as LiteMedSAM's TinyViT has them).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from polypsam.config import (
    CONF_DIR,
    datamodule_from_cfg,
    embedding_cache_from_cfg,
    model_from_cfg,
    prompt_from_cfg,
)
from polypsam.data.embedding_cache import EmbeddingCache, file_digest
from polypsam.data.io import read_image
from polypsam.errors import FrozenStateChanged
from polypsam.inference import Predictor
from polypsam.inference.predictor import preprocess
from polypsam.models import build_model
from polypsam.models.freeze import freeze_strategy
from polypsam.models.frozen import module_state
from polypsam.train import train
from polypsam.training.module import PolypSAMModule

pytestmark = pytest.mark.usefixtures("one_thread")

# 8 demo images, batch 2, accumulation 2: 4 batches = 2 optimiser steps per epoch
RUN = ["+experiment=tiny", "model=tiny_bn", "data.limit_train=8", "data.limit_val=4", "scratch.batch_size=2",
       "scratch.effective_batch_size=4", "scratch.max_epochs=2", "callbacks.rich_progress_bar=null",
       "callbacks.val_overlays=null", "test_after_training=false",
       "+callbacks.probe._target_=test_frozen.ModeProbe"]


class ModeProbe(L.Callback):
    """Records the ``training`` flag of every module at every forward call during training batches, and
    the frozen parts' tensors before and after fit (clones, compared bit for bit)."""

    last: ModeProbe | None = None

    def __init__(self):
        self.calls: dict[str, set[bool]] = {}
        self.in_train_batch = False
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []
        self.bn_before: torch.Tensor | None = None
        self.bn_after: torch.Tensor | None = None
        self.module = None
        ModeProbe.last = self

    def on_fit_start(self, trainer, pl_module):
        self.module = pl_module
        for name, m in pl_module.net.named_modules():
            m.register_forward_pre_hook(lambda mod, args, name=name: self._seen(name, mod))
        self.before = [t.clone() for t in self.frozen_state(pl_module.net, pl_module.frozen_modules)]
        self.bn_before = self._bn(pl_module).running_mean.clone()

    def _seen(self, name, mod):
        if self.in_train_batch:
            self.calls.setdefault(name, set()).add(mod.training)

    @staticmethod
    def frozen_state(net, frozen_modules):
        mods = dict(net.named_modules())
        return [t for n in frozen_modules for t in module_state(mods[n])]

    @staticmethod
    def _bn(pl_module):
        return next(m for m in pl_module.net.image_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.in_train_batch = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.in_train_batch = False

    def on_fit_end(self, trainer, pl_module):
        self.after = [t.clone() for t in self.frozen_state(pl_module.net, pl_module.frozen_modules)]
        self.bn_after = self._bn(pl_module).running_mean.clone()

    def modes(self, prefix: str) -> set[bool]:
        """The flags seen at forward calls of modules under ``prefix`` (dotted name) in training batches."""
        return {f for n, flags in self.calls.items() if n == prefix or n.startswith(f"{prefix}.") for f in flags}


def _cfg(tmp, name, *extra):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[*RUN, f"paths.root_dir={tmp}", f"paths.cache_dir={tmp / 'cache'}",
                                           f"paths.output_dir={tmp / name}", *extra])


def _strategy(name: str) -> list[str]:
    return [f"strategy={name}", *(["strategy.lora.rank=4"] if name == "lora" else [])]


def _fit(tmp, name, *extra) -> tuple[dict, ModeProbe]:
    results = train(_cfg(tmp, name, *extra))
    return results, ModeProbe.last


@pytest.mark.parametrize("strategy", ["dec", "lora", "custom"])
def test_frozen_parts_run_in_eval_mode_and_stay_bit_identical(tmp_path, strategy):
    extra = ["strategy.freeze=[image_encoder]"] if strategy == "custom" else []
    results, probe = _fit(tmp_path, strategy, *_strategy(strategy), *extra)
    frozen = probe.module.frozen_modules
    assert frozen and results["epochs"] == 2
    seen_frozen = set().union(*(probe.modes(f) for f in frozen))
    assert seen_frozen == {False}  # every forward call of a frozen module during fit, in eval mode
    assert probe.modes("mask_decoder.transformer") == {True}  # what trains, trains in train mode
    if strategy == "lora":
        adapters = [n for n in probe.calls if ".lora_dropout." in n or n.endswith(".lora_A.default")]
        assert adapters and all(probe.calls[n] == {True} for n in adapters)
    assert len(probe.before) == len(probe.after) > 0
    assert all(torch.equal(a, b) for a, b in zip(probe.before, probe.after))  # parameters and buffers
    assert torch.equal(probe.bn_before, probe.bn_after)


def test_enc_dec_still_updates_its_batchnorm_statistics(tmp_path):
    """... and experiments/encoder_bn_check.py, which tells what moved (statistics or weights), validates the
    run's best checkpoint as the run did: the same validation Dice."""
    import importlib.util

    results, probe = _fit(tmp_path, "enc_dec", "strategy=enc_dec")
    assert probe.modes("image_encoder.1") == {True}  # the stem's BatchNorm trains with the encoder
    assert not torch.equal(probe.bn_before, probe.bn_after)
    spec = importlib.util.spec_from_file_location(
        "encoder_bn_check", Path(__file__).resolve().parents[1] / "experiments" / "encoder_bn_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    out = check.main([str(tmp_path / "enc_dec")])
    assert out["moved"]["bn_running_mean"] > 0 and out["moved"]["weights"] > 0
    assert out["val_dice"]["trained"] == pytest.approx(results["best_val_dice"], abs=1e-6)
    assert set(out["val_dice"]) == {"zero-shot", "trained", "trained, pretrained BatchNorm statistics"}


def test_norm_eval_keeps_the_batchnorm_statistics_while_its_weights_train(tmp_path):
    """strategy.norm_eval: the encoder's BatchNorm runs in eval mode in every training batch and keeps the
    running statistics it was built with, while its weight and bias, and the rest of the encoder, train."""
    results, probe = _fit(tmp_path, "norm_eval", "strategy=enc_dec", "strategy.norm_eval=true")
    assert results["epochs"] == 2
    assert probe.modes("image_encoder.1") == {False} and probe.modes("image_encoder.0") == {True}
    assert torch.equal(probe.bn_before, probe.bn_after)
    fresh = build_model("tiny_bn")
    bn = probe.module.net.image_encoder[1]
    assert torch.equal(bn.running_var, fresh.image_encoder[1].running_var)
    assert bn.weight.requires_grad and not torch.equal(bn.weight, fresh.image_encoder[1].weight)
    assert probe.module.frozen.norm_eval == ["image_encoder.1"]  # held, and guarded as frozen state
    with pytest.raises(Exception, match="strategy.norm_eval='yes'"):
        train(_cfg(tmp_path, "bad", "strategy=enc_dec", "strategy.norm_eval=yes"))


def test_resuming_mid_epoch_keeps_the_modes(tmp_path):
    """A run stopped after its 3rd batch (last.ckpt of optimiser step 1, mid-epoch) and resumed.

    The reference comes from outside the restore: a freshly built model's frozen parts, which the resumed
    run must have after the restore and at the end; a copy of the checkpoint whose frozen BatchNorm
    statistic moved is refused, naming the file. Checked: with the guard's reference taken after the
    restore again (``on_fit_start`` digesting the restored state, as before polypsam issue 25), the moved
    copy resumes and trains until the embedding cache's writer refuses the moved encoder in the middle of
    epoch 0, and this test fails on that message (which names a cache folder, not the checkpoint).
    """
    common = ["strategy=dec", "callbacks.last_checkpoint.every_n_train_steps=1"]
    with pytest.raises(torch.OutOfMemoryError):
        train(_cfg(tmp_path, "run", *common, "+callbacks.fault._target_=polypsam.training.callbacks.InjectFault",
                   "+callbacks.fault.kind=oom", "+callbacks.fault.at_batch=3"))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 1
    ckpt["state_dict"]["net.image_encoder.1.running_mean"].add_(0.5)
    torch.save(ckpt, tmp_path / "moved.ckpt")
    with pytest.raises(FrozenStateChanged, match=r"moved\.ckpt: frozen part 'image_encoder' differs"):
        _fit(tmp_path, "moved", *common, f"ckpt_path={tmp_path / 'moved.ckpt'}")

    results, probe = _fit(tmp_path, "run", *common, f"ckpt_path={last}")
    assert results["epochs"] == 2 and probe.calls
    frozen = probe.module.frozen_modules
    assert set().union(*(probe.modes(f) for f in frozen)) == {False}
    fresh = ModeProbe.frozen_state(model_from_cfg(_cfg(tmp_path, "fresh", *common).model), frozen)
    assert len(fresh) == len(probe.before) == len(probe.after) > 0
    assert all(torch.equal(a, b) for a, b in zip(fresh, probe.before))  # restored: as built
    assert all(torch.equal(a, b) for a, b in zip(fresh, probe.after))  # and so at the end


@pytest.mark.parametrize("cache, message", [
    ("false", r"^frozen part 'image_encoder' changed its weights or buffers before the checkpoint of global step 1"),
    ("auto", r"embeddings/v2/\w+: the image encoder's weights or buffers changed since this cache folder")])
def test_a_write_to_a_frozen_part_stops_the_run_naming_it(tmp_path, cache, message):
    """After batch 1 a drill writes to the frozen encoder: the cache writer (batch 2 fills entries) or the
    checkpoint of step 1 (the end of batch 2) stops the run; no checkpoint holds that state."""
    with pytest.raises(FrozenStateChanged, match=message):
        _fit(tmp_path, "bad", "strategy=dec", f"data.embedding_cache.enabled={cache}",
             "callbacks.last_checkpoint.every_n_train_steps=1", "validate_before_training=false",
             "+callbacks.fault._target_=polypsam.training.callbacks.InjectFault", "+callbacks.fault.kind=frozen_write",
             "+callbacks.fault.at_batch=1")
    assert not (tmp_path / "bad" / "checkpoints" / "last.ckpt").exists()


@pytest.mark.parametrize("strategy", ["dec", "lora"])
def test_best_checkpoint_restores_the_validated_model(tmp_path, strategy):
    """``trainer.validate`` of best.ckpt on a freshly built model gives the Dice the run logged for it."""
    results, probe = _fit(tmp_path, strategy, *_strategy(strategy), "validate_before_training=false")
    ckpt = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=False)
    if strategy == "lora":  # only what trained is stored; the frozen parts come from the base weights
        assert not any(".1.running_mean" in k for k in ckpt["state_dict"])
    cfg = _cfg(tmp_path, f"{strategy}_check", *_strategy(strategy))
    net = model_from_cfg(cfg.model, lora=cfg.strategy.get("lora"))
    frozen = freeze_strategy(net, cfg.strategy.freeze, prompt_from_cfg(cfg).unused_parameters)
    cache = embedding_cache_from_cfg(cfg, net)  # the entries the run's validation read (dec), or none (lora)
    module = PolypSAMModule(net, frozen_modules=frozen, loss=cfg.loss, embedding_cache=cache)
    dm = datamodule_from_cfg(cfg, image_size=net.spec.image_size, embedding_cache=cache)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    again = trainer.validate(module, datamodule=dm, ckpt_path=results["best_checkpoint"], verbose=False)[0]
    assert again["val/dice"] == pytest.approx(results["best_val_dice"], abs=1e-6)


def test_the_cache_writer_refuses_a_train_mode_or_changed_encoder(tmp_path):
    net = build_model("tiny_bn").eval()
    cache = EmbeddingCache.for_model(tmp_path, net)
    assert cache.dir == tmp_path / "v2" / net.encoder_fingerprint()
    emb = torch.zeros(32, 8, 8)
    cache.save("a" * 32, emb)
    net.image_encoder[1].train()
    with pytest.raises(FrozenStateChanged, match=r"v2/.*image encoder's '1' is in train mode"):
        cache.save("b" * 32, emb)
    net.image_encoder[1].eval()
    stats = net.image_encoder[1].running_mean
    saved = stats.clone()
    with torch.no_grad():
        stats.add_(0.1)
    with pytest.raises(FrozenStateChanged, match="weights or buffers changed since this cache folder"):
        cache.save("c" * 32, emb)
    with torch.no_grad():
        stats.copy_(saved)  # the same bytes again: the folder's encoder, checked by its fingerprint
    cache.save("d" * 32, emb)
    assert cache.has("a" * 32) and cache.has("d" * 32) and not cache.has("b" * 32) and not cache.has("c" * 32)


def test_entries_of_the_unversioned_cache_are_never_read(tmp_path):
    """polypsam before the write guard kept entries in ``<root>/<fingerprint>/``: some were computed in train mode."""
    net = build_model("tiny_bn").eval()
    old = EmbeddingCache(tmp_path / net.encoder_fingerprint())
    old.save("a" * 32, torch.ones(32, 8, 8))
    assert EmbeddingCache.for_model(tmp_path, net).load("a" * 32) is None


def test_bf16_training_fills_the_cache_with_exact_embeddings(tmp_path):
    """trainer.precision=bf16-mixed (what precision=auto picks on a CPU with AMX): the frozen encoder's
    cache entries are its fp32 embeddings, the ones evaluation computes and the cache's key promises,
    never bf16 ones (which differ by more than the cache's fp16 storage)."""
    cfg = _cfg(tmp_path, "bf16", "strategy=dec", "trainer.precision=bf16-mixed", "model.runtime=torch")
    results = train(cfg)
    assert results["epochs"] == 2
    net = ModeProbe.last.module.net.eval()
    cache = embedding_cache_from_cfg(cfg, net)
    images = {file_digest(p): p for p in Path(cfg.data.root).rglob("*") if p.suffix in (".png", ".jpg")}
    keys = [p.stem for p in cache.dir.glob("*/*.pt")]
    assert len(keys) == 12  # 8 training and 4 validation images
    predictor, worst_bf16 = Predictor(net, "cpu"), 0.0
    for key in keys:
        canvas, rz = preprocess(read_image(images[key]), net.spec)
        exact = predictor.encode(canvas[None], [rz])[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = predictor.encode(canvas[None], [rz])[0].float()
        scale = exact.abs().max()
        assert (cache.load(key).float() - exact).abs().max() <= 2e-3 * scale, key
        worst_bf16 = max(worst_bf16, float((low - exact).abs().max() / scale))
    assert worst_bf16 > 2e-3  # a bf16 entry would have failed the check above
