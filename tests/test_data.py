import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from polypsam.data.datamodule import PolypDataModule
from polypsam.data.files import find_pairs, find_test_sets
from polypsam.data.io import read_image, read_mask_report
from polypsam.errors import DataError


def _write(folder: Path, stem: str, ext: str, hw=(40, 50), mask_box=(10, 10, 30, 30), mask_ext=".png"):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(abs(hash(stem)) % 2**32).integers(0, 255, (*hw, 3), dtype=np.uint8)
    Image.fromarray(img).save(folder / "images" / f"{stem}{ext}")
    m = np.zeros(hw, np.uint8)
    if mask_box:
        y0, x0, y1, x1 = mask_box
        m[y0:y1, x0:x1] = 255
    Image.fromarray(m).save(folder / "masks" / f"{stem}{mask_ext}")


def test_pairs_by_stem_any_extension(tmp_path):
    d = tmp_path / "TrainDataset"
    for i, ext in enumerate([".jpg", ".png", ".tif", ".bmp"]):
        _write(d, f"img{i}", ext, mask_ext=[".png", ".tif", ".bmp", ".png"][i])
    pairs = find_pairs(d / "images", d / "masks")
    assert [p.stem for p in pairs] == ["img0", "img1", "img2", "img3"]
    assert pairs[2].image.suffix == ".tif" and pairs[2].mask.suffix == ".bmp"


def test_unpaired_files_are_listed(tmp_path):
    d = tmp_path / "TrainDataset"
    _write(d, "a", ".jpg")
    _write(d, "b", ".jpg")
    (d / "masks" / "b.png").unlink()
    shutil.copy(d / "masks" / "a.png", d / "masks" / "orphan.png")
    with pytest.raises(DataError, match=r"images without a mask.*b\.jpg.*masks without an image.*orphan\.png"):
        find_pairs(d / "images", d / "masks")


def test_duplicate_stems_are_an_error(tmp_path):
    d = tmp_path / "TrainDataset"
    _write(d, "a", ".jpg")
    shutil.copy(d / "images" / "a.jpg", d / "images" / "a.png")
    with pytest.raises(DataError, match="a.jpg / a.png"):
        find_pairs(d / "images", d / "masks")


def test_empty_root_and_missing_root(tmp_path):
    (tmp_path / "TrainDataset" / "images").mkdir(parents=True)
    (tmp_path / "TrainDataset" / "masks").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        PolypDataModule(root=str(tmp_path), image_size=64).setup("fit")
    with pytest.raises(DataError, match="does not exist"):
        PolypDataModule(root=str(tmp_path / "nope"), image_size=64).setup("fit")


def test_mask_of_another_size_names_the_file(tmp_path):
    d = tmp_path / "TrainDataset"
    for i in range(5):
        _write(d, f"s{i}", ".png")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(d / "masks" / "s3.png")
    with pytest.raises(DataError, match=r"s3\.png: mask is 20x20 but its image .*s3\.png is 50x40"):
        PolypDataModule(root=str(tmp_path), image_size=64, val_fraction=0.4).setup("fit")


def test_unreadable_image_names_the_file(tmp_path):
    good = tmp_path / "ok.jpg"
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(good)
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(good.read_bytes()[:200])
    empty = tmp_path / "zero.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    for p, what in ((trunc, "truncated"), (empty, "empty"), (text, "not an image")):
        with pytest.raises(DataError, match=rf"{p.name}.*{what}"):
            read_image(p)


def test_image_conversions(tmp_path):
    gray16 = (np.arange(400, dtype=np.uint16).reshape(20, 20) * 160)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 200
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    g = read_image(tmp_path / "g16.png")
    assert g.shape == (20, 20, 3) and g.dtype == np.uint8 and g.max() > 200
    r = read_image(tmp_path / "rgba.png")
    assert r.shape == (10, 10, 3) and (r[..., 0] == 200).all()
    m = np.zeros((10, 10), np.uint8)
    m[2:8, 2:8] = 255
    m[5, 5] = 130  # a JPEG-style artefact
    Image.fromarray(m).save(tmp_path / "m.png")
    rep = read_mask_report(tmp_path / "m.png")
    assert rep.nonbinary_pixels == 1 and rep.mask.sum() == 36


def test_split_is_seeded_written_and_reusable(tmp_path):
    d = tmp_path / "root" / "TrainDataset"
    for i in range(20):
        _write(d, f"s{i:02d}", ".png")
    _write(d, "empty", ".png", mask_box=None)
    out1, out2, out3 = tmp_path / "r1", tmp_path / "r2", tmp_path / "r3"
    a = PolypDataModule(root=str(tmp_path / "root"), image_size=64, output_dir=str(out1), split_seed=7)
    a.setup("fit")
    b = PolypDataModule(root=str(tmp_path / "root"), image_size=64, output_dir=str(out2), split_seed=7)
    b.setup("fit")
    s1, s2 = json.loads((out1 / "split.json").read_text()), json.loads((out2 / "split.json").read_text())
    assert s1["train"] == s2["train"] and s1["val"] == s2["val"]
    assert len(s1["val"]) == 4 and len(s1["train"]) == 17 and not set(s1["train"]) & set(s1["val"])
    c = PolypDataModule(root=str(tmp_path / "root"), image_size=64, output_dir=str(out3), split_seed=99)
    c.setup("fit")
    assert json.loads((out3 / "split.json").read_text())["val"] != s1["val"]
    reuse = PolypDataModule(root=str(tmp_path / "root"), image_size=64, output_dir=str(out3), split_seed=99,
                            split_file=str(out1 / "split.json"))
    reuse.setup("fit")
    assert sorted(r.relpath for r in reuse.val_set.records) == sorted(
        p for p in s1["val"] if "empty" not in p)
    # the empty mask is skipped, counted and reported, never silently dropped
    report = json.loads((out1 / "data_report.json").read_text())
    skipped = report["train"]["skipped_empty_mask"] + report["val"]["skipped_empty_mask"]
    assert skipped == ["TrainDataset/images/empty.png"]
    assert report["train"]["used"] + report["val"]["used"] == 20


def test_split_file_for_other_data_is_rejected(tmp_path):
    d = tmp_path / "TrainDataset"
    for i in range(5):
        _write(d, f"s{i}", ".png")
    bad = tmp_path / "split.json"
    bad.write_text(json.dumps({"train": ["TrainDataset/images/zzz.png"], "val": []}))
    with pytest.raises(DataError, match="not in the data root"):
        PolypDataModule(root=str(tmp_path), image_size=64, split_file=str(bad)).setup("fit")


def test_real_batch_with_per_component_boxes(small_root):
    dm = PolypDataModule(root=str(small_root), image_size=256, batch_size=4, num_workers=0,
                         prompt={"type": "box", "mode": "per_component", "min_area": 16}, limit_train=4)
    dm.setup("fit")
    dm.setup("test")
    assert list(dm.test_sets) == ["Kvasir", "CVC-ClinicDB"]
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape == (4, 3, 256, 256) and batch.images.dtype == torch.uint8
    assert batch.masks.shape == (4, 1, 256, 256)
    assert batch.prompts.boxes.shape[0] == batch.prompts.image_index.shape[0] >= 4
    for j in range(4):  # every box lies inside its image's resized region
        h, w = batch.input_hw[j].tolist()
        bx = batch.prompts.boxes[batch.prompts.image_index == j]
        assert len(bx) >= 1 and (bx[:, 2] <= w).all() and (bx[:, 3] <= h).all()


def test_test_sets_follow_paper_order(tmp_path):
    for name in ["ETIS-LaribPolypDB", "Zeta", "CVC-300", "Kvasir", "Alpha"]:
        (tmp_path / "TestDataset" / name).mkdir(parents=True)
    assert list(find_test_sets(tmp_path)) == ["Kvasir", "CVC-300", "ETIS-LaribPolypDB", "Alpha", "Zeta"]


def test_boxes_come_from_the_augmented_mask(tmp_path):
    import albumentations as A

    d = tmp_path / "TrainDataset"
    for i in range(6):
        _write(d, f"s{i}", ".png", hw=(40, 50), mask_box=(5, 2, 15, 12))  # rows 5..14, cols 2..11
    dm = PolypDataModule(root=str(tmp_path), image_size=50, num_workers=0, val_fraction=0.2,
                         augment=[A.HorizontalFlip(p=1.0)])
    dm.setup("fit")
    item = dm.train_set[0]
    assert item["prompts_original"].boxes.tolist() == [[38.0, 5.0, 47.0, 14.0]]  # mirrored: cols 38..47
    assert dm.val_set[0]["prompts_original"].boxes.tolist() == [[2.0, 5.0, 11.0, 14.0]]  # validation is not augmented


def test_nonbinary_masks_are_thresholded_and_reported(tmp_path):
    d = tmp_path / "TrainDataset"
    for i in range(5):
        _write(d, f"s{i}", ".png")
    m = np.asarray(Image.open(d / "masks" / "s1.png")).copy()
    m[0, :3] = 90  # JPEG-style artefacts below the threshold
    Image.fromarray(m).save(d / "masks" / "s1.png")
    dm = PolypDataModule(root=str(tmp_path), image_size=64, output_dir=str(tmp_path / "run"), val_fraction=0.2)
    dm.setup("fit")
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    merged = {**report["train"]["masks_thresholded"], **report["val"]["masks_thresholded"]}
    assert merged == {"TrainDataset/images/s1.png": 3}
