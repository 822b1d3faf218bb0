"""One test class over every registered model (tiny configuration where the model allows it)."""

import numpy as np
import pytest
import torch

from polypsam.errors import CheckpointError, ConfigError
from polypsam.models import available_models, build_model, get_spec
from polypsam.models.attention import SdpaDecoderAttention, use_sdpa_decoder_attention
from polypsam.models.freeze import STRATEGIES, freeze_strategy, parameter_counts
from polypsam.models.mask_head import is_stock_upscaling, mask_logits_channels_last, mask_logits_stock
from polypsam.models.sam import merge_prompt_logits
from polypsam.prompts.box import BoxPrompt

# total parameters of the official models (image + prompt encoder + mask decoder)
OFFICIAL_PARAMS = {"vit_b": 93_735_472, "vit_l": 312_342_832, "vit_h": 641_090_608}


def test_registry_lists_models_and_rejects_unknown():
    assert {"vit_b", "vit_l", "vit_h", "lite", "tiny"} <= set(available_models())
    with pytest.raises(ConfigError, match="registered models: .*vit_b"):
        build_model("vit_x")


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_official_architectures_build(name):
    with torch.device("meta"):  # the real architecture, without allocating its weights
        net = build_model(name, pretrained=False)
    assert sum(p.numel() for p in net.parameters()) == OFFICIAL_PARAMS[name]
    spec = get_spec(name)
    assert (spec.image_size, spec.embedding_size, spec.normalization) == (1024, 64, "mean_std")


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_missing_official_checkpoint_says_what_to_do(name, tmp_path):
    with pytest.raises(CheckpointError) as err:
        build_model(name, checkpoint_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "dl.fbaipublicfiles.com/segment_anything/sam_" in msg
    assert f"python -m polypsam.weights download {name}" in msg


def test_lite_is_pretrained():
    net = build_model("lite")
    spec = net.spec
    assert (spec.image_size, spec.normalization, spec.embedding_size) == (256, "minmax", 64)
    assert 9e6 < sum(p.numel() for p in net.parameters()) < 11e6
    rand = build_model("lite", pretrained=False)
    assert not torch.equal(net.mask_decoder.iou_token.weight, rand.mask_decoder.iou_token.weight)


def _batch(spec, b=2, boxes_per_image=(1, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    s = spec.image_size
    images = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g)
    input_hw = torch.tensor([[s, s * 3 // 4]] * b)
    boxes, idx = [], []
    for j in range(b):
        for _ in range(boxes_per_image[j % len(boxes_per_image)]):
            x0, y0 = torch.randint(0, s // 2, (2,), generator=g).tolist()
            boxes.append([x0, y0, x0 + s // 4, y0 + s // 3])
            idx.append(j)
    return images, input_hw, torch.tensor(boxes, dtype=torch.float32), torch.tensor(idx)


# the pretrained LiteMedSAM takes seconds per case: the full suite runs it, make test-fast the tiny model
CPU_MODELS = ["tiny", pytest.param("lite", marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=CPU_MODELS)
def model_name(request):
    return request.param


class TestEveryModel:
    def test_batched_forward_equals_one_by_one(self, model_name):
        net = build_model(model_name).eval()
        images, hw, boxes, idx = _batch(net.spec, b=2, boxes_per_image=(1, 1))
        with torch.no_grad():
            both, _ = net(images, hw, boxes, idx)
            one = torch.cat([net(images[j:j + 1], hw[j:j + 1], boxes[j:j + 1], torch.tensor([0]))[0]
                             for j in range(2)])
        assert both.shape == (2, 1, net.spec.image_size, net.spec.image_size)
        assert torch.allclose(both, one, atol=1e-4)

    def test_decoder_matches_stock_sam_single_mask(self, model_name):
        """Our batched decoder equals SAM's MaskDecoder(multimask_output=False) for each box."""
        net = build_model(model_name).eval()
        images, hw, boxes, idx = _batch(net.spec, b=2, boxes_per_image=(1, 2))
        with torch.no_grad():
            emb = net.encode(images, hw)
            ours, iou = net.decode(emb, boxes, idx)
            for k in range(len(boxes)):
                sp, de = net.prompt_encoder(points=None, boxes=boxes[k:k + 1], masks=None)
                ref, ref_iou = net.mask_decoder(image_embeddings=emb[idx[k]:idx[k] + 1],
                                                image_pe=net.prompt_encoder.get_dense_pe(),
                                                sparse_prompt_embeddings=sp, dense_prompt_embeddings=de,
                                                multimask_output=False)
                assert torch.allclose(ours[k:k + 1], ref, atol=1e-4)
                assert torch.allclose(iou[k:k + 1], ref_iou, atol=1e-5)

    def test_fast_decoder_equals_stock_in_float64_forward_and_backward(self, model_name):
        """SDPA decoder attention + channels-last mask head == SAM's stock MaskDecoder, values and grads.

        The mask decoders run in float64; SAM's prompt encoder casts box coordinates to float32 itself,
        so it stays float32 in both paths (its outputs are exact in float64).
        """
        fast, stock = build_model(model_name), build_model(model_name, attention="stock")
        stock.load_state_dict(fast.state_dict())
        fast.mask_decoder.double()
        stock.mask_decoder.double()
        assert fast._mask_logits is mask_logits_channels_last and stock._mask_logits is mask_logits_stock
        assert use_sdpa_decoder_attention(fast.mask_decoder) == 7  # 2 layers x 3 + the final one
        assert not any(isinstance(m, SdpaDecoderAttention) for m in stock.modules())
        spec = fast.spec
        g = torch.Generator().manual_seed(3)
        emb = torch.randn(2, spec.embedding_dim, spec.embedding_size, spec.embedding_size, generator=g,
                          dtype=torch.float64)
        _, _, boxes, idx = _batch(spec, b=2, boxes_per_image=(1, 2))
        ours, iou = fast.decode(emb, boxes, idx)
        ref, ref_iou = [], []
        # one float32 prompt-encoder call for all boxes, as decode makes (batching changes its rounding)
        sp, de = stock.prompt_encoder(points=None, boxes=boxes, masks=None)
        for k in range(len(boxes)):
            m, q = stock.mask_decoder(image_embeddings=emb[idx[k]:idx[k] + 1],
                                      image_pe=stock.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sp[k:k + 1], dense_prompt_embeddings=de[k:k + 1],
                                      multimask_output=False)
            ref.append(m)
            ref_iou.append(q)
        ref, ref_iou = torch.cat(ref), torch.cat(ref_iou)
        assert ours.shape == ref.shape == (3, 1, spec.low_res_size, spec.low_res_size)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(iou, ref_iou, rtol=1e-10, atol=1e-10)
        weight = torch.randn(ours.shape, generator=g, dtype=torch.float64)
        (ours * weight).sum().backward()
        (ref * weight).sum().backward()
        ref_grads = dict(stock.mask_decoder.named_parameters())
        checked = 0
        for name, p in fast.mask_decoder.named_parameters():
            if name.startswith(("iou_prediction_head", "output_hypernetworks_mlps.1", "output_hypernetworks_mlps.2",
                                "output_hypernetworks_mlps.3")):
                continue  # no gradient from a single-mask loss, in either path
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-9, atol=1e-10, msg=name)
            checked += 1
        assert checked > 40

    def test_several_boxes_merge_into_one_mask(self, model_name):
        net = build_model(model_name).eval()
        images, hw, boxes, idx = _batch(net.spec, b=2, boxes_per_image=(1, 2))
        with torch.no_grad():
            emb = net.encode(images, hw)
            low, _ = net.decode(emb, boxes, idx)
        merged = merge_prompt_logits(low, idx, 2)
        assert torch.equal(merged[0], low[0]) and torch.equal(merged[1], torch.maximum(low[1], low[2]))

    @pytest.mark.parametrize("strategy", ["dec", "enc_dec", "lora"])
    def test_strategy_trains_what_it_says(self, model_name, strategy):
        net = build_model(model_name, lora={} if strategy == "lora" else None)
        frozen = freeze_strategy(net, STRATEGIES[strategy], BoxPrompt().unused_parameters)
        before = {k: v.detach().clone() for k, v in net.named_parameters()}
        images, hw, boxes, idx = _batch(net.spec, b=2)
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1.0)
        encoder_grad = strategy != "dec"
        logits, _ = net(images, hw, boxes, idx, encoder_grad=encoder_grad)
        logits.sigmoid().mean().backward()
        opt.step()
        after = dict(net.named_parameters())
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        enc = {k for k in changed if k.startswith("image_encoder.")}
        assert any(k.startswith("mask_decoder.") for k in changed)
        assert not any(k.startswith("mask_decoder.iou_prediction_head") for k in changed)
        assert not any(k.startswith(f) for k in changed for f in frozen)
        if strategy == "dec":
            assert not enc and not any(k.startswith("prompt_encoder.") for k in changed)
            assert parameter_counts(net)["image_encoder"]["trainable"] == 0
        elif strategy == "lora":  # the adapters only (B: A's first gradient is zero while B is)
            assert enc and all(".lora_B." in k for k in enc)
        else:
            assert enc
        # every trainable parameter got a gradient: DDP needs no find_unused_parameters
        assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_minmax_normalisation_ignores_padding():
    net = build_model("lite", pretrained=False)
    img = torch.zeros(1, 3, 256, 256, dtype=torch.uint8)
    img[:, :, :100, :200] = torch.randint(50, 200, (3, 100, 200), dtype=torch.uint8)
    x = net.normalize(img, torch.tensor([[100, 200]]))
    valid = x[:, :, :100, :200]
    assert torch.isclose(valid.min(), torch.tensor(0.0)) and torch.isclose(valid.max(), torch.tensor(1.0))
    assert x[:, :, 100:].abs().max() == 0 and x[:, :, :, 200:].abs().max() == 0
    ref = img[:, :, :100, :200].float()
    assert torch.allclose(valid, (ref - ref.min()) / (ref.max() - ref.min()))


def test_unknown_freeze_path_is_a_clear_error():
    net = build_model("tiny")
    with pytest.raises(ConfigError, match="not a submodule.*image_encoder"):
        freeze_strategy(net, ["image_encodr"])
    frozen = freeze_strategy(net, ["image_encoder.blocks.0"])
    assert "image_encoder.blocks.0" in frozen
    assert not any(p.requires_grad for p in net.image_encoder.blocks[0].parameters())
    assert all(p.requires_grad for p in net.image_encoder.blocks[1].parameters())
    assert np.isclose(parameter_counts(net)["total"]["frozen"],
                      sum(p.numel() for p in net.parameters() if not p.requires_grad))


def test_other_mask_heads_keep_the_stock_path():
    """A decoder whose upscaling is not SAM's 2x2/2 layout is decoded by SAM's own NCHW code."""
    net = build_model("tiny")
    up = net.mask_decoder.output_upscaling
    assert is_stock_upscaling(up)
    other = torch.nn.Sequential(torch.nn.ConvTranspose2d(32, 8, 4, stride=2, padding=1), *list(up)[1:])
    assert not is_stock_upscaling(other)
    assert not is_stock_upscaling(torch.nn.Sequential(*list(up)[:4]))

    class LayerNorm2d(torch.nn.Module):  # SAM's name and attributes, another class: recognised by class, not name
        def __init__(self, n):
            super().__init__()
            self.weight, self.bias, self.eps = torch.nn.Parameter(torch.ones(n)), torch.nn.Parameter(torch.zeros(n)), 1e-6

    assert not is_stock_upscaling(torch.nn.Sequential(up[0], LayerNorm2d(up[1].weight.numel()), *list(up)[2:]))
    g = torch.Generator().manual_seed(0)
    tokens, hyper = torch.randn(2, 16, 16, 32, generator=g), torch.randn(2, 4, generator=g)
    fast = mask_logits_channels_last(up, tokens, hyper)
    torch.testing.assert_close(fast, mask_logits_stock(up, tokens, hyper), rtol=1e-5, atol=1e-5)
    assert mask_logits_stock(other, tokens, hyper).shape == fast.shape == (2, 1, 64, 64)
