"""model.channels_last: the study's encoder-trained rows lay LiteMedSAM's encoder out in NHWC for speed
(benchmarks/encoder_steps.py); what the encoder computes and learns must not change with it."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from polypsam.config import CONF_DIR
from polypsam.data.io import read_image
from polypsam.errors import ConfigError
from polypsam.inference.predictor import preprocess
from polypsam.models import build_model
from polypsam.training.build import build_module

pytestmark = pytest.mark.slow  # the real encoder, forward and backward, twice


def _job(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=["+sweep=lite_cpu", "+sweep/lite_cpu_jobs=enc_dec_box_s42", *overrides])


def _conv_weights(net):
    """The encoder's conv weights with more than one input channel (a depthwise weight has one layout)."""
    return [m.weight for m in net.image_encoder.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[1] > 1]


def _nhwc(w: torch.Tensor) -> bool:
    """(O, I, kh, kw) strided as NHWC: the channel stride is 1 and a step in width skips I values; a 1 x 1
    weight is "contiguous" in both layouts, so its strides, not is_contiguous, tell them apart."""
    return w.stride()[1] == 1 and w.stride()[3] == w.shape[1]


def test_the_encoder_rows_train_the_same_encoder_in_nhwc(real_root):
    """Composed as the study composes the row: the encoder's conv weights are NHWC, and on real frames the
    encoder's output and its gradient equal those of the NCHW twin (same weights) within the train-mode
    BatchNorm's rounding, and to fp32 rounding in eval mode; the cache fingerprint is the same. Checked to
    fail: with the job's channels_last removed, the layout assertion fails."""
    cfg = _job()
    assert cfg.model.channels_last is True
    nhwc, nchw = build_module(cfg).net, build_module(_job("model.channels_last=false")).net
    assert len(_conv_weights(nhwc)) >= 10
    assert all(_nhwc(w) for w in _conv_weights(nhwc)) and not any(_nhwc(w) for w in _conv_weights(nchw))
    assert nhwc.encoder_fingerprint() == nchw.encoder_fingerprint()
    images = sorted((real_root / "TestDataset" / "Kvasir" / "images").iterdir())[:1]  # one frame: train-mode BatchNorm still averages over its positions
    canvases = [preprocess(read_image(p), nhwc.spec) for p in images]
    x = torch.stack([c for c, _ in canvases])
    hw = torch.tensor([rz.input_hw for _, rz in canvases])
    with torch.no_grad():  # eval mode (evaluation, and a frozen encoder): the same to fp32 rounding (3e-6)
        ref = nchw.eval().encode(x, hw)
        assert (nhwc.eval().encode(x, hw) - ref).abs().max() <= 2e-5 * ref.abs().max()
    out = {}
    for name, net in (("nhwc", nhwc), ("nchw", nchw)):
        net.train()
        emb = net.encode(x, hw)
        emb.square().mean().backward()
        out[name] = emb.detach(), {k: p.grad.clone() for k, p in net.image_encoder.named_parameters()}
    emb_a, grads_a = out["nhwc"]
    emb_b, grads_b = out["nchw"]
    # train mode: torch's NHWC BatchNorm on a CPU computes the batch variance less exactly than its NCHW kernel
    # (on a low-variance input, 2e-3 against 1e-4 from fp64), so the two agree to 5e-4 of the largest value
    # here, not the 3e-6 of eval mode or of a change in thread count
    assert (emb_a - emb_b).abs().max() <= 2e-3 * emb_b.abs().max()
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 100
    flat_a, flat_b = (torch.cat([g[k].flatten() for k in sorted(g)]) for g in (grads_a, grads_b))
    assert (flat_a - flat_b).norm() <= 1e-3 * flat_b.norm()  # 1.3e-4 measured on two frames


def test_channels_last_on_a_prompt_free_baseline_is_a_clear_error():
    with pytest.raises(ConfigError, match="model.channels_last=true lays out a SAM image encoder"):
        build_model("unet", pretrained=False, channels_last=True, encoder_weights=None)
    with pytest.raises(ConfigError, match="model.channels_last='yes'"):
        build_model("tiny", pretrained=False, channels_last="yes")
