"""The frozen-encoder embedding cache: same logits, never a stale hit, atomic concurrent fills.

Tolerance: the cache stores embeddings in fp16, whose rounding changes each value by at most 2^-11
(4.9e-4) relative. Through the decoder that must stay a small fraction of the logit scale: we require
max |logits_cached - logits_fresh| <= 1e-3 * max |logits_fresh| + 1e-4 (measured: 3e-4 on tiny, 7e-5 on
lite) and the same mask (logit > 0) on at least 99.9% of pixels. That the difference comes from the
fp16 rounding alone is checked exactly: decoding the fp16-rounded embedding gives the cached logits.
"""

import copy
import dataclasses
import multiprocessing as mp
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from polypsam.config import embedding_cache_from_cfg
from polypsam.data.batch import collate
from polypsam.data.datamodule import PolypDataModule
from polypsam.data.dataset import PolypDataset, Record
from polypsam.data.embedding_cache import EmbeddingCache, file_digest
from polypsam.data.files import find_pairs
from polypsam.errors import ConfigError, DataError
from polypsam.evaluation import EvalSettings, evaluate_model
from polypsam.models import build_model
from polypsam.models.freeze import STRATEGIES, freeze_strategy
from polypsam.prompts.box import BoxPrompt
from polypsam.training.module import PolypSAMModule
from test_evaluate import make_root


def _records(real_root, n):
    d = real_root / "TestDataset" / "Kvasir"
    return [Record(p.image, p.mask, p.stem, "Kvasir", p.image.name, key=file_digest(p.image))
            for p in find_pairs(d / "images", d / "masks")[:n]]


def _dec(name):
    net = build_model(name, pretrained=name == "lite").eval()  # frozen parts encode in eval mode
    return net, freeze_strategy(net, STRATEGIES["dec"], BoxPrompt().unused_parameters)


def _close(cached, fresh):
    diff = (cached - fresh).abs().max().item()
    assert diff <= 1e-3 * fresh.abs().max().item() + 1e-4, diff
    assert ((cached > 0) == (fresh > 0)).float().mean().item() >= 0.999


@pytest.mark.parametrize("name,n", [("tiny", 3), ("lite", 1)])  # lite: ~3-10 s per image on this CPU
def test_same_logits_with_and_without_the_cache(real_root, tmp_path, name, n):
    net, frozen = _dec(name)
    cache = EmbeddingCache.for_model(tmp_path, net)
    module = PolypSAMModule(net, frozen_modules=frozen, embedding_cache=cache).eval()
    ds = PolypDataset(_records(real_root, n), net.spec.image_size, BoxPrompt(), embedding_cache=cache,
                      resize_method=net.spec.resize_method)
    cold = collate([ds[i] for i in range(n)])
    assert not cold.embedded.any() and cold.embeddings is None
    seen = []
    hook = net.image_encoder.register_forward_hook(lambda mod, args, out: seen.append(out))
    with torch.no_grad():
        fresh, _ = module(cold)  # encodes, and fills the cache
    hook.remove()
    (emb,) = seen  # the fp32 embedding the fresh logits came from
    assert cache.writes == n and len(cache) == n
    warm = collate([ds[i] for i in range(n)])
    assert warm.embedded.all() and warm.images is None and warm.embeddings.dtype == torch.float16
    assert torch.equal(warm.embeddings, emb.half())  # what was stored is the fresh embedding in fp16
    with torch.no_grad():
        cached, _ = module(warm)
        rounded, _ = net(None, warm.input_hw, warm.prompts.boxes, warm.prompts.image_index,
                         embeddings=emb.half().float())
    _close(cached, fresh)
    torch.testing.assert_close(cached, rounded, rtol=0, atol=1e-5)
    if n > 1:  # a batch mixing cached and uncached images (a new image joins a filled cache)
        (cache.path(warm.keys[1])).unlink()
        mixed = collate([ds[i] for i in range(n)])
        assert mixed.embedded.tolist() == [True, False] + [True] * (n - 2)
        with torch.no_grad():
            out, _ = module(mixed)
        _close(out, fresh)
        assert cache.path(warm.keys[1]).exists()  # refilled


def test_other_weights_or_preprocessing_never_hit(real_root, tmp_path):
    net, _ = _dec("tiny")
    rec = _records(real_root, 1)
    cache = EmbeddingCache.for_model(tmp_path, net)
    with torch.no_grad():
        cache.save(rec[0].key, net.encode(*_image(net, rec)))
    assert build_model("tiny", pretrained=False).encoder_fingerprint() == net.encoder_fingerprint()  # stable

    changed = copy.deepcopy(net)
    with torch.no_grad():
        next(changed.image_encoder.parameters()).view(-1)[0] += 1e-3  # one weight
    specs = [dataclasses.replace(net.spec, normalization="minmax"),
             dataclasses.replace(net.spec, pixel_mean=(0.0, 0.0, 0.0)),
             dataclasses.replace(net.spec, resize_method="cv2_area")]
    others = [changed]
    for spec in specs:
        other = copy.deepcopy(net)
        other.spec = spec
        others.append(other)
    keys = {o.encoder_fingerprint() for o in others}
    assert len(keys) == len(others) and net.encoder_fingerprint() not in keys
    for other in others:
        oc = EmbeddingCache.for_model(tmp_path, other)
        assert oc.dir != cache.dir and oc.load(rec[0].key) is None
        item = PolypDataset(rec, 64, BoxPrompt(), embedding_cache=oc)[0]
        assert "embedding" not in item and "image" in item  # the image is encoded again, never the stale one
    # the decoder and prompt encoder are not part of the key: training them keeps the cache valid
    dec_changed = copy.deepcopy(net)
    with torch.no_grad():
        next(dec_changed.mask_decoder.parameters()).view(-1)[0] += 1.0
    assert dec_changed.encoder_fingerprint() == net.encoder_fingerprint()
    assert "embedding" in PolypDataset(rec, 64, BoxPrompt(), embedding_cache=cache)[0]


def _image(net, rec):
    ds = PolypDataset(rec, net.spec.image_size, BoxPrompt())
    b = collate([ds[0]])
    return b.images, b.input_hw


def _expected(i: int) -> torch.Tensor:
    return torch.randn(32, 8, 8, generator=torch.Generator().manual_seed(i))


def _fill(root, keys, barrier, writes, slot):
    torch.set_num_threads(1)
    cache = EmbeddingCache(Path(root) / "model")
    barrier.wait()  # all writers start together
    for _ in range(4):
        for i, k in enumerate(keys):
            cache.save(k, _expected(i))
    writes[slot] = cache.writes


def test_concurrent_fill(tmp_path):
    keys = [f"{i:02x}" * 16 for i in range(10)]
    ctx = mp.get_context("fork")  # the writers only serialise tensors: forking is safe and fast
    barrier, writes = ctx.Barrier(4), ctx.Array("i", 4)
    procs = [ctx.Process(target=_fill, args=(str(tmp_path), keys, barrier, writes, i)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    assert list(writes) == [4 * len(keys)] * 4
    cache = EmbeddingCache(tmp_path / "model")
    for i, k in enumerate(keys):
        got = cache.load(k)
        assert got is not None and got.dtype == torch.float16
        assert torch.equal(got, _expected(i).half())
    assert len(cache) == len(keys)
    assert not list(tmp_path.rglob("*.tmp"))


def test_augmentation_and_cache_are_mutually_exclusive(tmp_path):
    flip = A.HorizontalFlip(p=0.5)
    with pytest.raises(ConfigError, match="mutually exclusive"):
        PolypDataModule(root=str(tmp_path), image_size=64, augment=[flip],
                        embedding_cache=EmbeddingCache(tmp_path / "c" / "m"))
    net, _ = _dec("tiny")

    def cfg(enabled, augment):
        return OmegaConf.create({"data": {"augment": augment,
                                          "embedding_cache": {"enabled": enabled, "dir": str(tmp_path / "e")}}})

    aug = [{"_target_": "albumentations.HorizontalFlip", "p": 0.5}]
    with pytest.raises(ConfigError, match="mutually exclusive"):
        embedding_cache_from_cfg(cfg(True, aug), net)
    assert embedding_cache_from_cfg(cfg("auto", aug), net) is None  # auto steps aside for augmentation
    assert isinstance(embedding_cache_from_cfg(cfg("auto", None), net), EmbeddingCache)
    enc_dec = build_model("tiny", pretrained=False)  # trainable encoder
    assert embedding_cache_from_cfg(cfg("auto", None), enc_dec) is None
    with pytest.raises(ConfigError, match="frozen image encoder"):
        embedding_cache_from_cfg(cfg(True, None), enc_dec)


def test_resident_embeddings_are_read_once_and_equal_the_disk_cache(real_root, tmp_path):
    """resident=True: the loader ships keys, not tensors; the module serves the disk cache's fp16 values."""
    n = 3
    net, frozen = _dec("tiny")
    disk = EmbeddingCache.for_model(tmp_path, net)
    resident = EmbeddingCache.for_model(tmp_path, net, resident=True)
    module = PolypSAMModule(net, frozen_modules=frozen, embedding_cache=resident).eval()
    records = _records(real_root, n)

    def batch(cache):
        ds = PolypDataset(records, net.spec.image_size, BoxPrompt(), embedding_cache=cache,
                          resize_method=net.spec.resize_method)
        return collate([ds[i] for i in range(n)])

    cold = batch(resident)
    assert not cold.embedded.any() and cold.images is not None
    with torch.no_grad():
        first, _ = module(cold)  # encodes, writes the disk cache, keeps them in memory
    assert resident.writes == n and len(module.resident) == n
    assert all(e.dtype == torch.float16 for e in module.resident.values())
    warm = batch(resident)
    assert warm.embedded.all() and warm.images is None and warm.embeddings is None  # nothing decoded or read
    with torch.no_grad():
        served, _ = module(warm)
        from_disk, _ = module.net(None, warm.input_hw, warm.prompts.boxes, warm.prompts.image_index,
                                  embeddings=batch(disk).embeddings.float())
    torch.testing.assert_close(served, first, rtol=0, atol=0)
    torch.testing.assert_close(served, from_disk, rtol=0, atol=1e-6)
    assert resident.hits == 0  # never read back from disk by the module that wrote it

    # a new run (empty memory, filled disk) reads each entry once, then serves from memory
    again = PolypSAMModule(net, frozen_modules=frozen,
                           embedding_cache=EmbeddingCache.for_model(tmp_path, net, resident=True)).eval()
    with torch.no_grad():
        for _ in range(2):
            out, _ = again(batch(again.embedding_cache))
            torch.testing.assert_close(out, served, rtol=0, atol=0)
    assert again.embedding_cache.hits == n and again.embedding_cache.writes == 0

    # an entry that cannot be read is named, with the fix
    fresh = PolypSAMModule(net, frozen_modules=frozen,
                           embedding_cache=EmbeddingCache.for_model(tmp_path, net, resident=True)).eval()
    bad = fresh.embedding_cache.path(warm.keys[1])
    bad.write_bytes(b"not a tensor")
    with pytest.raises(DataError, match=f"{bad}.*{records[1].image.name}.*delete it"):
        fresh(batch(fresh.embedding_cache))


def test_resident_flag_reaches_the_cache(tmp_path):
    net, _ = _dec("tiny")
    cfg = OmegaConf.create({"data": {"augment": None, "embedding_cache": {
        "enabled": "auto", "dir": str(tmp_path), "resident": True}}})
    assert embedding_cache_from_cfg(cfg, net).resident
    cfg.data.embedding_cache.resident = False
    assert not embedding_cache_from_cfg(cfg, net).resident


def test_evaluation_reads_the_embeddings_training_cached(tmp_path):
    """Evaluation encodes each test image once per encoder: the second evaluation reads every embedding from
    the cache, and its scores equal those of encoding (fp16 storage, as training and validation read it)."""
    root = make_root(tmp_path / "root")
    net = build_model("tiny", pretrained=False).eval()
    plain = evaluate_model(net, root, tmp_path / "a", EvalSettings(noise=(), figures=False, device="cpu"),
                           verbose=False)
    cached = EvalSettings(noise=(), figures=False, device="cpu", embedding_dir=str(tmp_path / "cache"))
    first = evaluate_model(net, root, tmp_path / "b", cached, verbose=False)
    second = evaluate_model(net, root, tmp_path / "c", cached, verbose=False)
    readable = int((plain.per_image["status"] == "ok").sum())
    assert f"(0 read, {readable} written" in first.meta["embeddings"]
    assert f"({readable} read, 0 written" in second.meta["embeddings"] and plain.meta["embeddings"] == "encoded"
    np.testing.assert_allclose(second.per_image["dice"], plain.per_image["dice"], atol=2e-3)
