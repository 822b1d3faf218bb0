"""The segmentation-models-pytorch baselines: tiny encoders (timm's test_resnet, no weights), through the same
LightningModule, data module, split file, evaluation and export as SAM."""

import json
import logging

import pytest
import torch
from hydra import compose, initialize_config_dir

from polypsam.config import CONF_DIR
from polypsam.data.splits import make_split, write_split
from polypsam.errors import ConfigError
from polypsam.export import main as export_main
from polypsam.models import build_model, get_spec, takes_prompts
from polypsam.models.baselines import IMAGENET_MEAN, SmpSegmenter
from polypsam.models.freeze import STRATEGIES, freeze_strategy
from polypsam.prompts.none import NonePrompt
from polypsam.train import train
from polypsam.training.checkpoints import load_model

TINY = {"encoder_name": "tu-test_resnet", "encoder_weights": None, "image_size": 64,
        "arch_kwargs": {"decoder_channels": [32, 16, 16, 8, 8]}}
BASELINES = {"unet": {}, "unetplusplus": {}, "smp": {"arch": "fpn", "arch_kwargs": {}}}
RUN = ["+experiment=tiny", "model=unet", "model.encoder_name=tu-test_resnet", "model.encoder_weights=null",
       "model.image_size=64", "data.limit_train=8", "data.limit_val=4", "data.limit_test=2", "scratch.batch_size=4",
       "callbacks.rich_progress_bar=null", "callbacks.val_overlays=null"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _build(name: str, **extra) -> SmpSegmenter:
    return build_model(name, **{**TINY, **BASELINES[name], **extra})


def _cfg(tmp, out, *extra):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[*RUN, f"paths.root_dir={tmp}", f"paths.cache_dir={tmp / 'cache'}",
                                           f"paths.output_dir={out}", *extra])


def _inputs(b=2, s=64):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g)
    return images, torch.tensor([[s, s * 3 // 4]] * b), torch.tensor([[4.0, 4, 30, 40]] * b), torch.arange(b)


@pytest.mark.parametrize("name", sorted(BASELINES))
class TestEveryBaseline:
    def test_spec_and_prompt_free_forward(self, name):
        net = _build(name).eval()
        assert not takes_prompts(net) and get_spec(name).image_size == 352  # the registry's default: PraNet's size
        spec = net.spec
        assert (spec.image_size, spec.pixel_mean, spec.normalization) == (64, IMAGENET_MEAN, "mean_std")
        images, hw, boxes, idx = _inputs()
        with torch.no_grad():
            both, iou = net(images, hw, boxes, idx)
            one = torch.cat([net(images[j:j + 1], hw[j:j + 1], None, idx[:1])[0] for j in range(2)])
            free, _ = net(None, hw, None, idx, embeddings=net.encode(images, hw), prompt_free=torch.ones(2, dtype=bool))
        assert both.shape == (2, 1, 64, 64) and iou.shape == (2, 1) and bool(iou.isnan().all())
        torch.testing.assert_close(both, one, rtol=1e-5, atol=1e-5)  # batched == one by one, prompts ignored
        torch.testing.assert_close(both, free, rtol=1e-5, atol=1e-5)
        x = net.normalize(images, hw)  # ImageNet statistics inside the image, zero in the pad
        assert x[:, :, :, 48:].abs().max() == 0 and x[:, :, :, :48].abs().max() > 1

    def test_enc_dec_trains_every_parameter(self, name):
        net = _build(name).train()
        frozen = freeze_strategy(net, STRATEGIES["enc_dec"], NonePrompt().unused_parameters)
        assert frozen == []  # SAM's prompt-unused parts do not exist here
        images, hw, boxes, idx = _inputs()
        logits, _ = net(images, hw, boxes, idx)
        logits.sigmoid().mean().backward()
        assert all(p.grad is not None for p in net.parameters())


def test_bad_settings_are_one_clear_line(tmp_path):
    with pytest.raises(ConfigError, match="unknown setting.*decoder; its own settings: encoder_name"):
        build_model("unet", **TINY, decoder="x")
    with pytest.raises(ConfigError, match="model.image_size=100: .*multiple of 32"):
        build_model("unet", **{**TINY, "image_size": 100})
    with pytest.raises(ConfigError, match="model.arch='unet3'.*choose one of unet, unetplusplus"):
        build_model("smp", **TINY, arch="unet3")
    with pytest.raises(ConfigError, match="Wrong encoder name `resnet7`"):
        build_model("unet", **{**TINY, "encoder_name": "resnet7"})
    with pytest.raises(ConfigError, match="model.gradient_checkpointing=true: unet has no ViT blocks"):
        build_model("unet", **TINY, gradient_checkpointing=True)
    # SAM's strategies: dec has no prompt encoder to freeze, lora no SAM encoder to adapt
    with pytest.raises(ConfigError, match="'prompt_encoder' is not a part of unet, a prompt-free baseline .*"
                                          "strategy=enc_dec trains it whole"):
        train(_cfg(tmp_path, tmp_path / "dec", "strategy=dec"))
    with pytest.raises(ConfigError, match="strategy=lora adapts a SAM image encoder; .*use strategy=enc_dec"):
        train(_cfg(tmp_path, tmp_path / "lora", "strategy=lora"))
    with pytest.raises(ConfigError, match="embedding_cache.enabled=true: model=unet is a prompt-free baseline"):
        train(_cfg(tmp_path, tmp_path / "cache", "data.embedding_cache.enabled=true"))


def test_unet_run_on_a_given_split_evaluates_and_exports(tmp_path, caplog, capsys):
    import segmentation_models_pytorch as smp

    from polypsam.data.demo import generate_demo_dataset

    root = generate_demo_dataset(tmp_path / "data" / "demo-synthetic")
    images = sorted(p.relative_to(root).as_posix() for p in (root / "TrainDataset" / "images").iterdir())
    given = write_split(tmp_path / "sam_run" / "split.json", make_split(images, 0.25, seed=7))  # another run's
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="polypsam.train"):
        results = train(_cfg(tmp_path, out, f"data.split_file={given}"))
    assert "model=unet is a prompt-free baseline: prompt=box does not apply, the run uses prompt=none" in caplog.text
    ours, theirs = (json.loads(p.read_text()) for p in (out / "split.json", given))
    assert (ours["train"], ours["val"]) == (theirs["train"], theirs["val"])
    assert results["model"] == "unet" and set(results["test"]) >= {"test/Synthetic-Clear/dice"}
    meta = json.loads((out / "eval" / "meta.json").read_text())
    assert meta["prompt"]["type"] == "none" and meta["n_images"] == 4
    net, ckpt_meta = load_model(out / "checkpoints" / "best.ckpt")
    assert isinstance(net, SmpSegmenter) and ckpt_meta["spec"]["image_size"] == 64
    assert export_main([str(out)]) == 0 and "segmentation_models_pytorch" in capsys.readouterr().out
    model = smp.create_model("unet", encoder_name="tu-test_resnet", encoder_weights=None, classes=1)
    model.load_state_dict(torch.load(out / "export" / "unet.pth", weights_only=True), strict=True)
    images, hw, boxes, idx = _inputs(b=1)
    with torch.no_grad():
        ref = model.eval()(net.normalize(images, hw))
        mine, _ = net(images, hw, boxes, idx)
    torch.testing.assert_close(ref, mine, rtol=1e-5, atol=1e-5)


def test_offline_imagenet_weights_stop_with_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    # what HF_HUB_OFFLINE=1 and HF_HUB_CACHE=<empty folder> set when huggingface_hub is imported
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError) as err:
        build_model("unet", encoder_name="resnet18", image_size=64)  # encoder_weights: imagenet by default
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("model.encoder_weights=imagenet: cannot fetch the imagenet weights of "
                                              "encoder resnet18 from Hugging Face Hub smp-hub/resnet18.imagenet")
    assert msg.endswith("offline, model.encoder_weights=null trains the encoder from scratch.")
