"""The pre-resized image cache: identical samples to decoding, keys that cannot go stale, atomic writes."""

import logging
import multiprocessing as mp
import shutil

import albumentations as A
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from polypsam.config import datamodule_from_cfg, image_cache_from_cfg
from polypsam.data.dataset import PolypDataset, Record
from polypsam.data.files import find_pairs
from polypsam.data.image_cache import ImageCache
from polypsam.errors import ConfigError, DataError
from polypsam.prompts import PromptSet
from polypsam.prompts.box import BoxPrompt


def _records(real_root, n=3):
    out = []
    for name in ("Kvasir", "CVC-ClinicDB"):  # two source sizes: 1350x1080-ish JPEGs and 384x288 PNGs
        d = real_root / "TestDataset" / name
        for p in find_pairs(d / "images", d / "masks")[:n]:
            out.append(Record(p.image, p.mask, p.stem, name, p.image.name))
    return out


def _assert_same(a: dict, b: dict):
    assert set(a) == set(b)
    for k, v in a.items():
        if torch.is_tensor(v):
            assert torch.equal(v, b[k]), k
        elif isinstance(v, PromptSet):
            assert v.as_json() == b[k].as_json(), k
        elif isinstance(v, np.ndarray):
            assert np.array_equal(v, b[k]), k
        else:
            assert v == b[k], k


@pytest.mark.parametrize("size,method", [(1024, "pil_bilinear"), (256, "cv2_area"), (64, "pil_bilinear")])
def test_cached_samples_equal_decoded_ones(real_root, tmp_path, size, method):
    recs = _records(real_root)
    plain = PolypDataset(recs, size, BoxPrompt(), resize_method=method)
    cache = ImageCache(tmp_path, size, method)
    cached = PolypDataset([Record(r.image, r.mask, r.name, r.source, r.relpath) for r in recs], size, BoxPrompt(),
                          resize_method=method, image_cache=cache)
    cold = [cached[i] for i in range(len(recs))]
    assert (cache.writes, cache.hits, len(cache)) == (len(recs), 0, len(recs))
    warm = [cached[i] for i in range(len(recs))]
    assert cache.hits == len(recs) and cache.writes == len(recs)  # second pass: served, nothing decoded
    for i in range(len(recs)):
        ref = plain[i]
        ref["key"] = cold[i]["key"]  # the uncached dataset has no digest to report
        _assert_same(ref, cold[i])
        _assert_same(ref, warm[i])
    # only the resized region is stored, not the pad
    h, w = warm[0]["input_hw"].tolist()
    assert np.load(cache.path(cold[0]["key"])).shape == (h, w, 3)


def test_key_covers_bytes_size_and_method(tmp_path):
    img = tmp_path / "images" / "a.png"
    msk = tmp_path / "masks" / "a.png"
    img.parent.mkdir()
    msk.parent.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(img)
    m = np.zeros((90, 120), np.uint8)
    m[20:60, 30:90] = 255
    Image.fromarray(m).save(msk)
    root = tmp_path / "cache"
    dirs = {ImageCache(root, 64, "pil_bilinear").dir, ImageCache(root, 64, "cv2_area").dir,
            ImageCache(root, 128, "pil_bilinear").dir}
    assert len(dirs) == 3
    cache = ImageCache(root, 64)
    first = PolypDataset([Record(img, msk, "a", "t", "a.png")], 64, BoxPrompt(), image_cache=cache)[0]
    # new pixels under the same file name: a new digest, so a miss and the new image, never the old one
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(img)
    again = PolypDataset([Record(img, msk, "a", "t", "a.png")], 64, BoxPrompt(), image_cache=cache)[0]
    fresh = PolypDataset([Record(img, msk, "a", "t", "a.png")], 64, BoxPrompt())[0]
    assert again["key"] != first["key"]
    assert torch.equal(again["image"], fresh["image"]) and not torch.equal(again["image"], first["image"])
    assert cache.writes == 2 and cache.hits == 0


def test_unreadable_entry_is_a_miss_and_is_rewritten(real_root, tmp_path):
    recs = _records(real_root, n=1)[:1]
    cache = ImageCache(tmp_path, 128)
    ds = PolypDataset(recs, 128, BoxPrompt(), image_cache=cache)
    good = ds[0]
    path = cache.path(good["key"])
    path.write_bytes(path.read_bytes()[:50])  # a damaged disk
    assert torch.equal(ds[0]["image"], good["image"])
    assert cache.writes == 2 and np.load(path).shape[2] == 3


def test_mask_of_another_size_still_fails_with_a_warm_cache(tmp_path, real_root):
    src = _records(real_root, n=1)[0]
    d = tmp_path / "set"
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    shutil.copy(src.image, d / "images" / src.image.name)
    shutil.copy(src.mask, d / "masks" / src.mask.name)
    rec = Record(d / "images" / src.image.name, d / "masks" / src.mask.name, src.name, "t", src.image.name)
    cache = ImageCache(tmp_path / "c", 64)
    PolypDataset([rec], 64, BoxPrompt(), image_cache=cache)[0]
    Image.fromarray(np.full((20, 30), 255, np.uint8)).save(rec.mask)  # now the mask does not fit the image
    with pytest.raises(DataError, match=r"mask is 30x20 but its image"):
        PolypDataset([rec], 64, BoxPrompt(), image_cache=cache)[0]


def test_augmentation_bypasses_the_cache_and_says_so(real_root, tmp_path, caplog):
    recs = _records(real_root, n=2)
    cache = ImageCache(tmp_path, 64)
    aug = A.Compose([A.HorizontalFlip(p=1.0)], seed=0)
    with caplog.at_level(logging.INFO, logger="polypsam.data.dataset"):
        ds = PolypDataset(recs, 64, BoxPrompt(), train=True, augment=aug, image_cache=cache)
    assert ds.image_cache is None
    assert "image_cache bypassed" in caplog.text and "full-resolution" in caplog.text
    item = ds[0]
    assert len(cache) == 0 and cache.writes == 0
    # flipped, so not what the cache would have served
    plain = PolypDataset(recs, 64, BoxPrompt())[0]
    h, w = item["input_hw"].tolist()
    assert torch.equal(item["image"][:, :h, :w], plain["image"][:, :h, :w].flip(-1))


def test_cache_of_another_size_or_method_is_refused(tmp_path):
    with pytest.raises(ValueError, match="64 px"):
        PolypDataset([], 128, BoxPrompt(), image_cache=ImageCache(tmp_path, 64))
    with pytest.raises(ValueError, match="cv2_area"):
        PolypDataset([], 64, BoxPrompt(), image_cache=ImageCache(tmp_path, 64, "cv2_area"))
    with pytest.raises(ValueError, match="resize method"):
        ImageCache(tmp_path, 64, "nearest")


def _fill(root, keys, barrier, writes, slot):
    cache = ImageCache(root, 32)
    barrier.wait()  # all writers start together
    for _ in range(5):
        for k in keys:
            cache.save(k, _region(k))
    writes[slot] = cache.writes


def _region(key: str) -> np.ndarray:
    return np.random.default_rng(int(key, 16) % 2**32).integers(0, 255, (24, 32, 3), dtype=np.uint8)


def test_concurrent_fill_is_atomic(tmp_path):
    keys = [f"{i:02x}" * 16 for i in range(12)]
    ctx = mp.get_context("fork")  # the writers only save numpy arrays: forking is safe and fast
    barrier, writes = ctx.Barrier(4), ctx.Array("i", 4)
    procs = [ctx.Process(target=_fill, args=(str(tmp_path), keys, barrier, writes, i)) for i in range(4)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join(60)
    assert [pr.exitcode for pr in procs] == [0] * 4
    assert list(writes) == [5 * len(keys)] * 4
    cache = ImageCache(tmp_path, 32)
    for k in keys:
        assert np.array_equal(cache.load(k, (24, 32)), _region(k))
    assert not list(tmp_path.rglob("*.tmp"))
    assert len(cache) == len(keys)


def _cfg(root, **image_cache):
    return OmegaConf.create({"data": {
        "_target_": "polypsam.data.datamodule.PolypDataModule", "root": str(root), "val_fraction": 0.3,
        "batch_size": 2, "num_workers": 0, "effective_batch_size": 2, "limit_train": 4, "limit_val": 2, "limit_test": 2,
        "embedding_cache": {"enabled": False, "dir": "unused"}, "image_cache": image_cache, "augment": None}})


def test_config_wires_the_cache_into_every_set(small_root, tmp_path):
    cfg = _cfg(small_root, enabled=True, dir=str(tmp_path / "img"))
    dm = datamodule_from_cfg(cfg, image_size=64)
    dm.setup()
    sets = [dm.train_set, dm.val_set, *dm.test_sets.values()]
    assert all(s.image_cache is dm.image_cache for s in sets) and dm.image_cache.image_size == 64
    for s in sets:
        for i in range(len(s)):
            s[i]
    assert len(dm.image_cache) == sum(len(s) for s in sets)
    assert datamodule_from_cfg(_cfg(small_root, enabled=False, dir="x"), image_size=64).image_cache is None
    assert image_cache_from_cfg(OmegaConf.create({"data": {}}), 64) is None  # configs without the block
    with pytest.raises(ConfigError, match="data.image_cache.dir"):
        image_cache_from_cfg(_cfg(small_root, enabled=True, dir=None), 64)
    with pytest.raises(ConfigError, match="enabled='auto'"):
        image_cache_from_cfg(_cfg(small_root, enabled="auto", dir="x"), 64)


def test_train_config_has_the_option():
    from hydra import compose, initialize_config_dir

    from polypsam.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["data.image_cache.enabled=true", "paths.cache_dir=/tmp/pc"])
    assert cfg.data.image_cache.enabled is True
    assert cfg.data.image_cache.dir == "/tmp/pc/images"
