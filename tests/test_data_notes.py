"""Data notes: masks stretched by a speck (specks.py, prepare, data_report.json) and near-duplicates across
the split (neighbours.py), on small trees written here; the speck count once on the real test set."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from polypsam.curation.neighbours import MAX_BITS, find_neighbours
from polypsam.curation.neighbours import main as neighbours_main
from polypsam.curation.prepare import prepare
from polypsam.curation.specks import box_growth, speck_report
from polypsam.curation.specks import main as specks_main
from polypsam.data.datamodule import PolypDataModule
from polypsam.data.embedding_cache import EmbeddingCache, file_digest
from polypsam.errors import DataError

HW = (48, 64)


def _mask(speck: bool = False, empty: bool = False) -> np.ndarray:
    m = np.zeros(HW, np.uint8)
    if not empty:
        m[30:42, 40:56] = 255  # the polyp: 192 px, far from the corner
    if speck:
        m[0, 0] = 255  # PraNet's stray pixel
    return m


def _scene(seed: int) -> np.ndarray:
    """A smooth random image (a 6x8 grid upsampled), so that its dHash has structure."""
    small = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((HW[1], HW[0]), Image.BICUBIC))


def _pair(folder: Path, stem: str, image: np.ndarray, mask: np.ndarray) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / "images" / f"{stem}.png")
    Image.fromarray(mask).save(folder / "masks" / f"{stem}.png")


@pytest.fixture
def tree(tmp_path) -> Path:
    """TrainDataset: 10 scenes (t0 and t1 with a speck); TestDataset/A: a near copy of t3 (speck) and a new
    scene; TestDataset/B: a new scene."""
    root = tmp_path / "data"
    for i in range(10):
        _pair(root / "TrainDataset", f"t{i}", _scene(i), _mask(speck=i < 2))
    near = np.clip(_scene(3).astype(int) + np.random.default_rng(0).integers(-3, 4, (*HW, 3)), 0, 255)
    _pair(root / "TestDataset" / "A", "copy3", near.astype(np.uint8), _mask(speck=True))
    _pair(root / "TestDataset" / "A", "new", _scene(100), _mask())
    _pair(root / "TestDataset" / "B", "other", _scene(101), _mask())
    return root


def test_box_growth_counts_specks_only():
    assert box_growth(_mask()) == 0.0
    assert box_growth(_mask(empty=True)) is None
    g = box_growth(_mask(speck=True))
    assert g == pytest.approx(56 * 42 / (16 * 12) - 1)  # box from (0,0) to the polyp's far corner
    assert box_growth(_mask(speck=True), min_area=1) == 0.0  # a 1 px component counts at min_area 1
    grown = _mask()
    grown[20:30, 40:56] = 255  # a bigger polyp, no speck
    assert box_growth(grown) == 0.0


def test_speck_report_names_the_stretched_masks(tree):
    masks = sorted((tree / "TrainDataset" / "masks").glob("*.png"))
    rep = speck_report(masks, tree, threads=1)
    assert rep["masks"] == 10 and rep["stretched"] == 2 and rep["min_area"] == 16
    assert list(rep["stretched_masks"]) == ["TrainDataset/masks/t0.png", "TrainDataset/masks/t1.png"]


def test_data_report_and_prepare_report_carry_specks(tree, tmp_path, capsys):
    run = tmp_path / "run"
    PolypDataModule(root=str(tree), image_size=64, output_dir=str(run), val_fraction=0.2,
                    speck_report=speck_report).setup("fit")
    rep = json.loads((run / "data_report.json").read_text())
    split = json.loads((run / "split.json").read_text())
    for part in ("train", "val"):
        expected = sorted(f"TrainDataset/masks/{Path(p).stem}.png" for p in split[part]
                          if Path(p).stem in ("t0", "t1"))
        assert sorted(rep[part]["specks"]["stretched_masks"]) == expected
        assert rep[part]["specks"]["masks"] == len(split[part])

    out = tmp_path / "prepared"
    result = prepare([tree], out)
    specks = {rel: e["specks"]["stretched"] for rel, e in result.report["sets"].items()}
    assert specks == {"TrainDataset": 2, "TestDataset/A": 1, "TestDataset/B": 0}
    on_disk = json.loads((out / "prepare_report.json").read_text())
    assert list(on_disk["sets"]["TestDataset/A"]["specks"]["stretched_masks"]) == ["TestDataset/A/masks/copy3.png"]
    assert "TestDataset/A: 1 of 2 masks have a speck" in capsys.readouterr().out


def test_specks_command_reads_only(tree, tmp_path, capsys):
    before = sorted(p for p in tree.rglob("*"))
    assert specks_main([str(tree), "--out", str(tmp_path / "s.json")]) == 0
    assert sorted(p for p in tree.rglob("*")) == before
    sets = json.loads((tmp_path / "s.json").read_text())["sets"]
    assert {k: v["stretched"] for k, v in sets.items()} == {"TrainDataset": 2, "TestDataset/A": 1,
                                                            "TestDataset/B": 0}
    assert specks_main([str(tmp_path / "nowhere")]) == 2
    assert "no TrainDataset or TestDataset" in capsys.readouterr().err


def test_neighbours_flag_the_copy_and_only_the_copy(tree, tmp_path):
    split = {"train": [f"TrainDataset/images/t{i}.png" for i in range(8)],
             "val": ["TrainDataset/images/t8.png", "TrainDataset/images/t9.png"]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    cache = EmbeddingCache(tmp_path / "emb" / "model")
    for p in sorted(tree.rglob("images/*.png")):  # an 'embedding' that is the image itself
        cache.save(file_digest(p), torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1).float())
    rep = find_neighbours(tree, str(tmp_path / "split.json"), cache.dir)
    assert rep["sets"]["A"] == {"images": 2, "compared_with": 10, "hash_near_duplicates": 1,
                                "embedding_near_duplicates": 1}
    assert rep["sets"]["B"]["hash_near_duplicates"] == 0 and rep["sets"]["validation"]["compared_with"] == 8
    assert rep["sets"]["validation"]["hash_near_duplicates"] == 0
    copy = next(p for p in rep["pairs"] if p["image"].endswith("copy3.png"))
    assert copy["hash_match"] == copy["embedding_match"] == "TrainDataset/images/t3.png"
    assert copy["hash_bits"] <= MAX_BITS < min(p["hash_bits"] for p in rep["pairs"] if p is not copy)


def test_neighbours_command_writes_json_and_figures(tree, tmp_path, capsys):
    cache = EmbeddingCache(tmp_path / "emb" / "model")
    out, fig = tmp_path / "n" / "neighbours.json", tmp_path / "n" / "pairs.png"
    assert neighbours_main([str(tree), "--out", str(out), "--figure", str(fig)]) == 0
    assert json.loads(out.read_text())["sets"]["A"]["hash_near_duplicates"] == 1
    assert fig.read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "n" / "pairs-embedding.png").exists()
    assert "A: 1 of 2 frames have a near-duplicate among 10 training frames" in capsys.readouterr().out
    # an embedding cache without these images: one line naming the folder and the fix
    assert neighbours_main([str(tree), "--embeddings", str(cache.dir)]) == 2
    err = capsys.readouterr().err
    assert str(cache.dir) in err and "13 of 13 images have no embedding" in err and len(err.splitlines()) == 1
    with pytest.raises(DataError, match="no TrainDataset folder"):
        find_neighbours(tmp_path / "nowhere")


def test_real_kvasir_test_masks_stretched_by_the_corner_pixel(real_root):
    masks = sorted((real_root / "TestDataset" / "Kvasir" / "masks").glob("*.png"))
    rep = speck_report(masks, real_root)
    assert (rep["masks"], rep["stretched"]) == (60, 12)
    for rel in rep["stretched_masks"]:
        assert np.asarray(Image.open(real_root / rel))[0, 0] == 255  # the (0,0) pixel of the issue
