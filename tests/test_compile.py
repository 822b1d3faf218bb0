"""``model.compile``: torch.compile of the image encoder, in place, checkpoints and cache keys unchanged."""

import os

import pytest
import torch
from hydra import compose, initialize_config_dir

from polypsam.config import CONF_DIR, model_from_cfg
from polypsam.errors import ConfigError
from polypsam.models import build_model


def _batch():
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8, generator=g), torch.tensor([[64, 50], [40, 64]]),
            torch.tensor([[1.0, 1, 30, 30], [2, 2, 20, 20]]), torch.tensor([0, 1]))


def _compiled(net) -> bool:
    return getattr(net.image_encoder, "_compiled_call_impl", None) is not None


def test_compile_option_from_config():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for model in ("tiny", "lite", "vit_b", "vit_l", "vit_h"):
            assert compose(config_name="train", overrides=[f"model={model}"]).model.compile is False
        cfg = compose(config_name="train", overrides=["model=tiny", "model.compile=true"])
    net = model_from_cfg(cfg.model)
    plain = build_model("tiny", pretrained=False)
    assert _compiled(net) and not _compiled(plain)
    # in place: same parameter names, so checkpoints load either way and the embedding cache key holds
    assert list(net.state_dict()) == list(plain.state_dict())
    assert net.encoder_fingerprint() == plain.encoder_fingerprint()
    with pytest.raises(ConfigError, match="model.compile"):
        build_model("tiny", pretrained=False, compile="yes")


def test_compiled_encoder_traces_and_matches_eager():
    """Dynamo + AOT autograd over our SDPA attention, without inductor's C++ build (seconds, not a minute)."""
    net = build_model("tiny", pretrained=False)
    ref = build_model("tiny", pretrained=False)
    net.image_encoder.compile(backend="aot_eager")
    out, _ = net(*_batch())
    out.square().mean().backward()
    exp, _ = ref(*_batch())
    exp.square().mean().backward()
    torch.testing.assert_close(out, exp)
    for (name, a), b in zip(net.named_parameters(), ref.parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("POLYPSAM_TEST_INDUCTOR") != "1",
                    reason="inductor compiles the tiny encoder in ~68 s on this 2-core CPU (over the 60 s budget); "
                           "set POLYPSAM_TEST_INDUCTOR=1 to run")
def test_inductor_compile_runs_on_cpu():
    net = build_model("tiny", pretrained=False, compile=True)
    ref = build_model("tiny", pretrained=False)
    out, _ = net(*_batch())
    out.mean().backward()
    torch.testing.assert_close(out, ref(*_batch())[0], rtol=1e-4, atol=1e-5)
