"""Train/val images are decoded before fit (a truncated JPEG is a DataError then), and a pass is remembered."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from polypsam.data.checks import check_pairs
from polypsam.data.datamodule import PolypDataModule
from polypsam.data.io import image_size
from polypsam.errors import DataError


def _pranet(root: Path, n: int = 6, hw=(60, 80)) -> Path:
    d = root / "TrainDataset"
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8)).save(d / "images" / f"s{i}.jpg", quality=90)
        m = np.zeros(hw, np.uint8)
        m[10:30, 20:50] = 255
        Image.fromarray(m).save(d / "masks" / f"s{i}.png")
    return root


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _pairs(root: Path) -> list[tuple[Path, Path]]:
    d = root / "TrainDataset"
    return [(p, d / "masks" / f"{p.stem}.png") for p in sorted((d / "images").iterdir())]


def test_truncated_jpeg_is_a_data_error_before_training(tmp_path):
    root = _pranet(tmp_path / "data")
    bad = root / "TrainDataset" / "images" / "s3.jpg"
    _truncate(bad)
    assert image_size(bad) == (60, 80)  # the header check of before passes it
    dm = PolypDataModule(root=str(root), image_size=64, num_workers=0, val_fraction=0.34,
                         check_cache=str(tmp_path / "checks.json"))
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert str(bad) in msg and "truncated" in msg and "re-copy or remove it" in msg
    assert dm.train_set is None
    # the pairs that passed are remembered; the bad one is not
    files = json.loads((tmp_path / "checks.json").read_text())["files"]
    assert str(bad.resolve()) not in files and len(files) == 10  # 5 good pairs (the bad pair stops at its image)


def test_several_bad_files_are_counted_in_one_line(tmp_path):
    root = _pranet(tmp_path / "data")
    for i in (1, 4):
        _truncate(root / "TrainDataset" / "images" / f"s{i}.jpg")
    with pytest.raises(DataError, match=r"s1\.jpg.* 1 more pair\(s\) cannot be used either \(s4\.jpg\)"):
        check_pairs(_pairs(root), tmp_path / "checks.json", progress=False)


def test_mask_of_another_size_is_a_data_error(tmp_path):
    root = _pranet(tmp_path / "data")
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(root / "TrainDataset" / "masks" / "s2.png")
    with pytest.raises(DataError, match=r"s2\.png: mask is 40x30 but its image .*s2\.jpg is 80x60"):
        check_pairs(_pairs(root), None, progress=False)


def test_a_pass_is_remembered_and_a_changed_file_checked_again(tmp_path):
    root = _pranet(tmp_path / "data")
    cache = tmp_path / "cache" / "checks.json"
    first, stats = check_pairs(_pairs(root), cache, progress=True)
    assert (stats.decoded, stats.remembered) == (12, 0) and cache.is_file()
    second, stats = check_pairs(_pairs(root), cache, progress=True)
    assert (stats.decoded, stats.remembered) == (0, 12) and second == first
    assert first[0].image_hw == first[0].mask_hw == (60, 80) and first[0].foreground
    # a file replaced after the check (new size and mtime) is decoded again, and fails if it is now bad
    bad = root / "TrainDataset" / "images" / "s5.jpg"
    _truncate(bad)
    os.utime(bad, ns=(time.time_ns(), time.time_ns()))
    with pytest.raises(DataError, match="s5.jpg"):
        check_pairs(_pairs(root), cache, progress=False)


def test_datamodule_second_setup_decodes_nothing(tmp_path):
    root = _pranet(tmp_path / "data")
    cache = tmp_path / "checks.json"
    kw = dict(root=str(root), image_size=64, num_workers=0, val_fraction=0.34, check_cache=str(cache))
    dm = PolypDataModule(**kw)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 6
    n_files = len(json.loads(cache.read_text())["files"])
    mtime = cache.stat().st_mtime_ns
    dm2 = PolypDataModule(**kw)
    dm2.setup("fit")
    assert len(dm2.train_set) == len(dm.train_set) and n_files == 12
    assert cache.stat().st_mtime_ns == mtime  # nothing new to remember: not rewritten


def test_empty_masks_are_still_skipped_from_the_cache(tmp_path):
    root = _pranet(tmp_path / "data")
    Image.fromarray(np.zeros((60, 80), np.uint8)).save(root / "TrainDataset" / "masks" / "s0.png")
    kw = dict(root=str(root), image_size=64, num_workers=0, val_fraction=0.34, check_cache=str(tmp_path / "c.json"))
    for _ in range(2):  # decoded, then remembered: the same outcome
        dm = PolypDataModule(**kw)
        dm.setup("fit")
        skipped = dm.report["train"]["skipped_empty_mask"] + dm.report["val"]["skipped_empty_mask"]
        assert skipped == ["TrainDataset/images/s0.jpg"]


@pytest.mark.slow
def test_real_training_set_check_time_first_and_second_run(real_root, tmp_path):
    """TrainDataset (1,450 pairs in PraNet's release; the development copy may hold fewer) decoded once."""
    from polypsam.data.files import find_pairs

    pairs = [(p.image, p.mask) for p in find_pairs(real_root / "TrainDataset" / "images",
                                                    real_root / "TrainDataset" / "masks")]
    cache = tmp_path / "checks.json"
    t0 = time.perf_counter()
    _, first = check_pairs(pairs, cache, progress=True)
    t1 = time.perf_counter()
    _, second = check_pairs(pairs, cache, progress=True)
    t2 = time.perf_counter()
    print(f"\n{len(pairs)} pairs: first run {t1 - t0:.2f} s ({first.decoded} files decoded), "
          f"second run {t2 - t1:.2f} s ({second.decoded} decoded)")
    assert first.decoded == 2 * len(pairs) and second.decoded == 0 and second.remembered == 2 * len(pairs)
    assert t2 - t1 < (t1 - t0) / 5
