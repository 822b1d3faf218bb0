"""A resumed run starts from the frozen parts it was built with, through a real ``Trainer.fit``.

The frozen parts' reference is the freshly built model (its pretrained weights, or the base weights LoRA
adapts), never what a checkpoint restores: a ``last.ckpt`` whose frozen state moved (a BatchNorm statistic,
a LoRA base weight) is refused before fit trains, in one line naming the file and the part; a checkpoint
of no format, written before frozen parts were held frozen, is refused before anything is built.

Checked against the code before this guard (``FrozenParts.remember`` at ``on_fit_start``, after the
restore): the moved checkpoints resumed without an error, the unversioned ones too.
"""

from __future__ import annotations

import re

import pytest
import torch

from polypsam.cli import EXIT_ERROR, describe_failure
from polypsam.config import model_from_cfg, prompt_from_cfg
from polypsam.errors import CheckpointError, FrozenStateChanged
from polypsam.models.freeze import freeze_strategy
from polypsam.models.frozen import FrozenParts
from polypsam.train import train
from test_frozen import _cfg, _fit, _strategy

pytestmark = pytest.mark.usefixtures("one_thread")


def _edited(src, dst, edit):
    """A copy of checkpoint ``src`` at ``dst``, changed by ``edit(checkpoint)``."""
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    edit(ckpt)
    torch.save(ckpt, dst)
    return dst


def _one_line(exc: BaseException) -> str:
    failure = describe_failure(exc)
    assert failure.code == EXIT_ERROR and "\n" not in failure.line
    return failure.line


def _fresh(cfg):
    """The network a run of ``cfg`` builds, with its frozen parts, before anything is restored."""
    net = model_from_cfg(cfg.model, lora=cfg.strategy.get("lora"))
    return net, freeze_strategy(net, cfg.strategy.freeze, prompt_from_cfg(cfg).unused_parameters)


@pytest.fixture(scope="module")
def dec_last(tmp_path_factory):
    """One epoch of strategy=dec on tiny_bn: its last.ckpt."""
    tmp = tmp_path_factory.mktemp("dec")
    train(_cfg(tmp, "run", "strategy=dec", "scratch.max_epochs=1"))
    return tmp, tmp / "run" / "checkpoints" / "last.ckpt"


def test_a_checkpoint_whose_frozen_statistics_moved_is_refused(dec_last):
    """The stem's BatchNorm of tiny_bn, frozen with the encoder, moved by 0.5 in last.ckpt."""
    tmp, last = dec_last
    moved = _edited(last, tmp / "moved.ckpt", lambda c: c["state_dict"]["net.image_encoder.1.running_mean"].add_(0.5))
    with pytest.raises(FrozenStateChanged) as err:
        train(_cfg(tmp, "moved", "strategy=dec", f"ckpt_path={moved}"))
    assert re.match(rf"error: {re.escape(str(moved))}: frozen part 'image_encoder' differs from the weights "
                    r"this run was built with \(image_encoder\.1\.running_mean\).*start a new run from the "
                    "pretrained weights", _one_line(err.value))
    assert not list((tmp / "moved").rglob("*.ckpt"))  # refused before fit trained or saved anything

    results, probe = _fit(tmp, "resumed", "strategy=dec", f"ckpt_path={last}")  # the untouched one resumes
    assert results["epochs"] == 2 and probe.calls
    fresh, _ = _fresh(_cfg(tmp, "fresh", "strategy=dec"))
    best = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=False)
    assert torch.equal(best["state_dict"]["net.image_encoder.1.running_mean"], fresh.image_encoder[1].running_mean)


@pytest.mark.parametrize("edit", ["no format", "format 1"])
def test_a_checkpoint_written_before_the_format_is_refused_by_name(dec_last, edit):
    tmp, last = dec_last
    old = _edited(last, tmp / "old.ckpt",
                  lambda c: c["polypsam"].pop("format") if edit == "no format" else c["polypsam"].update(format=1))
    with pytest.raises(CheckpointError) as err:
        train(_cfg(tmp, "old", "strategy=dec", f"ckpt_path={old}"))
    assert _one_line(err.value).startswith(f"error: {old}: written before frozen parts were held frozen (the "
                                           "polypsam issue 18 fix")
    assert "start the run again" in str(err.value)
    assert not (tmp / "old" / "config_resolved.yaml").exists()  # refused before anything was built


@pytest.fixture(scope="module")
def lora_last(tmp_path_factory):
    """One epoch of strategy=lora on tiny_bn: its last.ckpt (adapters, decoder, the base weights' sha256)."""
    tmp = tmp_path_factory.mktemp("lora")
    train(_cfg(tmp, "run", *_strategy("lora"), "scratch.max_epochs=1"))
    return tmp, tmp / "run" / "checkpoints" / "last.ckpt"


def test_lora_checkpoints_and_the_guard_cover_the_network_between_them(lora_last):
    """What a LoRA checkpoint leaves out is exactly what the guard holds: no frozen tensor escapes both."""
    tmp, last = lora_last
    net, frozen = _fresh(_cfg(tmp, "fresh", *_strategy("lora")))
    guarded = set(FrozenParts(net, frozen).part)
    stored = {k.removeprefix("net.") for k in torch.load(last, weights_only=False)["state_dict"]}
    assert guarded.isdisjoint(stored) and guarded | stored == set(net.state_dict())
    assert "image_encoder.model.1.running_mean" in guarded  # the stem's BatchNorm: frozen, in eval mode
    assert "image_encoder.model.3.blocks.0.attn.qkv.base_layer.weight" in guarded  # peft's base weight


@pytest.mark.parametrize("key, part", [
    ("net.image_encoder.model.3.blocks.0.attn.qkv.base_layer.weight",
     "image_encoder.model.3.blocks.0.attn.qkv.base_layer.weight"),  # a base weight inside an adapted layer
    ("net.image_encoder.model.1.running_mean", "image_encoder.model.1")])  # a frozen BatchNorm statistic
def test_a_lora_checkpoint_with_a_moved_frozen_tensor_is_refused(lora_last, key, part):
    """A LoRA checkpoint stores no base weights; one written in, moved, would replace the model's own."""
    tmp, last = lora_last
    name = key.removeprefix("net.")
    cfg = _cfg(tmp, name, *_strategy("lora"), f"ckpt_path={tmp / 'moved.ckpt'}")
    base = _fresh(cfg)[0].state_dict()[name]
    moved = _edited(last, tmp / "moved.ckpt", lambda c: c["state_dict"].update({key: base + 0.5}))
    with pytest.raises(FrozenStateChanged) as err:
        train(cfg)
    assert _one_line(err.value).startswith(f"error: {moved}: frozen part {part!r} differs from the weights this "
                                           f"run was built with ({name})")
    assert not list((tmp / name).rglob("*.ckpt"))


def test_a_lora_checkpoint_of_other_base_weights_is_refused(lora_last):
    tmp, last = lora_last
    other = _edited(last, tmp / "other.ckpt", lambda c: c["polypsam"].update(base_sha256="0" * 64))
    with pytest.raises(CheckpointError) as err:
        train(_cfg(tmp, "other", *_strategy("lora"), f"ckpt_path={other}"))
    assert _one_line(err.value).startswith(f"error: {other}: its LoRA adapters were trained on base weights")


def test_an_untouched_lora_checkpoint_resumes(lora_last):
    tmp, last = lora_last
    results, probe = _fit(tmp, "resumed", *_strategy("lora"), f"ckpt_path={last}")
    assert results["epochs"] == 2 and probe.calls
