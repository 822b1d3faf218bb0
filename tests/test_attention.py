"""SDPA attention and gradient checkpointing for SAM's ViT encoder: exact equivalence to stock SAM.

All in float64 on CPU with small encoders; stock and switched models share the same weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import Attention, Block

from polypsam.models.attention import (
    CheckpointedBlock,
    SdpaAttention,
    enable_gradient_checkpointing,
    use_sdpa_attention,
    use_stock_attention,
)

TOL = 1e-10  # reached: about 4e-15 on outputs and input gradients, 2e-13 on parameter gradients

# 96 px / patch 8 = 12x12 grid; window 5 pads it to 15x15 (3x3 windows). 64 px -> 8x8, window 4: no pad.
PADDED = {"img_size": 96, "window_size": 5, "global_attn_indexes": (1, 3), "depth": 4}
UNPADDED = {"img_size": 64, "window_size": 4, "global_attn_indexes": (1,), "depth": 2}


def make_encoder(img_size=96, window_size=5, global_attn_indexes=(1, 3), depth=4, use_rel_pos=True, seed=0):
    torch.manual_seed(seed)
    enc = ImageEncoderViT(
        img_size=img_size, patch_size=8, embed_dim=48, depth=depth, num_heads=3, mlp_ratio=2.0,
        out_chans=32, use_rel_pos=use_rel_pos, rel_pos_zero_init=False, window_size=window_size,
        global_attn_indexes=global_attn_indexes,
    ).double()
    with torch.no_grad():  # non-trivial absolute and relative position terms
        for name, p in enc.named_parameters():
            if "rel_pos" in name or name == "pos_embed":
                p.copy_(torch.randn_like(p) * 0.5)
    kinds = {blk.window_size > 0 for blk in enc.blocks}
    assert kinds == {True, False}, "the model under test must have windowed and global blocks"
    return enc


def image(batch, img_size, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, img_size, img_size, dtype=torch.float64, generator=g)


def forward_backward(enc, x):
    """Output, input gradient and parameter gradients of a fixed random projection of the output."""
    enc.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = enc(x)
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(2))
    (out * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in enc.named_parameters()}
    return out.detach(), x.grad.clone(), grads


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("cfg", [PADDED, UNPADDED], ids=["padded-windows", "exact-windows"])
def test_sdpa_matches_stock_forward_and_backward(cfg):
    stock = make_encoder(**cfg)
    fast = copy.deepcopy(stock)
    n_attn = cfg["depth"]
    assert use_sdpa_attention(fast) == n_attn
    assert all(type(b.attn) is SdpaAttention for b in fast.blocks)
    assert all(type(b.attn) is Attention for b in stock.blocks)

    x = image(2, cfg["img_size"])
    out_s, gx_s, g_s = forward_backward(stock, x)
    out_f, gx_f, g_f = forward_backward(fast, x)
    assert out_s.shape == (2, 32, cfg["img_size"] // 8, cfg["img_size"] // 8)
    assert max_diff(out_s, out_f) < TOL
    assert max_diff(gx_s, gx_f) < TOL
    assert g_s.keys() == g_f.keys()
    for name in g_s:
        assert g_s[name].abs().max() > 0, name  # every parameter takes part, rel_pos included
        assert max_diff(g_s[name], g_f[name]) < TOL, name
    # rel-pos gradients of both block kinds were compared above
    rel = [n for n in g_s if n.endswith(("rel_pos_h", "rel_pos_w"))]
    assert len(rel) == 2 * n_attn


def test_sdpa_without_rel_pos_batch_two():
    stock = make_encoder(**UNPADDED, use_rel_pos=False)
    fast = copy.deepcopy(stock)
    use_sdpa_attention(fast)
    x = image(2, UNPADDED["img_size"])
    out_s, gx_s, g_s = forward_backward(stock, x)
    out_f, gx_f, g_f = forward_backward(fast, x)
    assert max_diff(out_s, out_f) < TOL
    assert max_diff(gx_s, gx_f) < TOL
    assert all(max_diff(g_s[n], g_f[n]) < TOL for n in g_s)
    # batch items are independent: item 1 alone gives the same output
    assert max_diff(fast(x[1:]).detach(), out_f[1:]) < TOL


@pytest.mark.parametrize("input_size, hw", [((5, 7), (5, 7)), ((6, 6), (8, 4))],
                         ids=["non-square", "interpolated-rel-pos"])
def test_single_attention_non_square_and_resized_tables(input_size, hw):
    """Height and width terms must not be swapped; tables of another length are interpolated."""
    torch.manual_seed(3)
    stock = Attention(24, num_heads=2, use_rel_pos=True, input_size=input_size).double()
    with torch.no_grad():
        stock.rel_pos_h.normal_()
        stock.rel_pos_w.normal_(std=2.0)
    fast = copy.deepcopy(stock)
    assert use_sdpa_attention(fast) == 1 and type(fast) is SdpaAttention
    x = torch.randn(3, *hw, 24, dtype=torch.float64)
    xs, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ys, yf = stock(xs), fast(xf)
    assert max_diff(ys, yf) < TOL
    ys.square().sum().backward()
    yf.square().sum().backward()
    assert max_diff(xs.grad, xf.grad) < TOL
    for (n, ps), pf in zip(stock.named_parameters(), fast.parameters()):
        assert max_diff(ps.grad, pf.grad) < TOL, n


def _shapes_seen(fn):
    """Input shapes of every op run (forward and backward) and the op names, via the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    shapes = [s for e in prof.events() for s in e.input_shapes if isinstance(s, list)]
    return shapes, {e.name for e in prof.events()}


def test_no_n_by_n_tensor_in_sdpa_path():
    """The folded route runs the fused CPU kernel and no op sees a (N, N) attention matrix."""
    n = (PADDED["img_size"] // 8) ** 2  # 144 tokens in the global blocks
    enc = make_encoder(**PADDED)
    x = image(1, PADDED["img_size"])

    def step():
        enc(x).sum().backward()

    def has_nn(shapes):  # (B*heads, N, N); 2-D (144, 144) also occurs: qkv's 3*48 outputs, by chance
        return any(len(s) >= 3 and s[-2:] == [n, n] for s in shapes)

    shapes, _ = _shapes_seen(step)
    assert has_nn(shapes)  # the stock encoder does build them: the check can fail
    use_sdpa_attention(enc)
    shapes, names = _shapes_seen(step)
    assert not has_nn(shapes)
    assert any("flash_attention" in name for name in names), sorted(names)


def test_state_dict_unchanged_and_strict_loading():
    stock = make_encoder(**PADDED)
    sd = stock.state_dict()
    fresh = make_encoder(**PADDED, seed=5)
    use_sdpa_attention(fresh)
    enable_gradient_checkpointing(fresh)
    assert list(fresh.state_dict().keys()) == list(sd.keys())
    fresh.load_state_dict(sd, strict=True)  # stock weights into the switched encoder
    x = image(1, PADDED["img_size"])
    with torch.no_grad():
        assert max_diff(fresh(x), stock(x)) < TOL
    # and a switched encoder's weights back into a stock one
    other = make_encoder(**PADDED, seed=6)
    other.load_state_dict(fresh.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(other(x), stock(x))


def test_switches_are_idempotent_and_reversible():
    enc = make_encoder(**PADDED)
    x = image(1, PADDED["img_size"])
    with torch.no_grad():
        ref = enc(x)
        assert use_sdpa_attention(enc) == 4
        assert use_sdpa_attention(enc) == 4
        assert all(type(b.attn) is SdpaAttention for b in enc.blocks)
        fast = enc(x)
        assert max_diff(fast, ref) < TOL and not torch.equal(fast, ref)  # really a different path
        assert use_stock_attention(enc) == 4
        assert use_stock_attention(enc) == 4
        assert all(type(b.attn) is Attention for b in enc.blocks)
        assert torch.equal(enc(x), ref)

        assert enable_gradient_checkpointing(enc) == 4
        assert enable_gradient_checkpointing(enc) == 4
        assert all(type(b) is CheckpointedBlock for b in enc.blocks)
        assert enable_gradient_checkpointing(enc, enabled=False) == 4
        assert enable_gradient_checkpointing(enc, enabled=False) == 4
        assert all(type(b) is Block for b in enc.blocks)
        assert torch.equal(enc(x), ref)
    # something that is not SAM's ViT: nothing to switch, and nothing changed
    lin = torch.nn.Linear(3, 3)
    assert use_sdpa_attention(lin) == 0 and type(lin) is torch.nn.Linear
    with pytest.raises(TypeError, match="nn.Module"):
        use_sdpa_attention(enc.state_dict())


@pytest.mark.parametrize("sdpa", [False, True], ids=["stock", "sdpa"])
def test_gradient_checkpointing_same_grads_and_recomputes(sdpa):
    plain = make_encoder(**PADDED)
    ckpt = copy.deepcopy(plain)
    if sdpa:
        use_sdpa_attention(plain)
        use_sdpa_attention(ckpt)
    assert enable_gradient_checkpointing(ckpt) == PADDED["depth"]

    calls = {}

    def counter(i):
        def hook(module, args, output):
            calls[i] = calls.get(i, 0) + 1
        return hook

    for i, blk in enumerate(ckpt.blocks):
        blk.attn.register_forward_hook(counter(i))

    x = image(2, PADDED["img_size"])
    plain.train(), ckpt.train()
    out_p, gx_p, g_p = forward_backward(plain, x)
    out_c, gx_c, g_c = forward_backward(ckpt, x)
    # recomputation of the same ops in the same order: bitwise-identical results
    assert torch.equal(out_p, out_c) and torch.equal(gx_p, gx_c)
    assert all(torch.equal(g_p[n], g_c[n]) for n in g_p)
    assert calls == {i: 2 for i in range(PADDED["depth"])}  # forward + recompute in backward

    calls.clear()  # no recomputation in eval mode or without grad
    ckpt.eval()
    forward_backward(ckpt, x)
    ckpt.train()
    with torch.no_grad():
        ckpt(x)
    assert calls == {i: 2 for i in range(PADDED["depth"])}  # one call each in the two forwards
