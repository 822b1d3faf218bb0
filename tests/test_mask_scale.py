"""Masks whose polyp lies below the threshold, and sets without any polyp, stop a command; they never
become a number.

Without the rule (``polypsam.data.io``: ``read_mask_report`` and ``require_foreground``) a test set of 0/100
masks reads as all-empty, and every empty prediction is then a correct rejection: ``Dice 1.0000 [1.0000,
1.0000]``, exit status 0; ``prepare`` writes the same masks as all-zero PNGs and exits 0.
"""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from polypsam.data.io import read_mask, read_mask_report
from polypsam.errors import DataError
from test_bad_input import TRAIN, assert_one_error, run_cli
from test_prepare import _run

FIX = "masks must be 0/255 or 0/1 binary"


def _rescale(masks: Path, value: int) -> list[Path]:
    """Every mask of the folder as 0/``value`` (0: all empty); the masks, in order."""
    out = sorted(masks.iterdir())
    for p in out:
        Image.fromarray((np.asarray(Image.open(p).convert("L")) > 127).astype(np.uint8) * value).save(p)
    return out


def test_what_a_mask_file_means(tmp_path):
    polyp = np.zeros((20, 30), bool)
    polyp[5:12, 8:20] = True
    for name, arr in (("m255.png", polyp * 255), ("m1.png", polyp * 1), ("bool.png", polyp)):
        Image.fromarray(arr if arr.dtype == bool else arr.astype(np.uint8)).save(tmp_path / name)
        assert (read_mask(tmp_path / name) == polyp).all(), name
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "empty.png")
    assert not read_mask(tmp_path / "empty.png").any()  # an empty frame is a mask, not an error
    # the polyp on another scale: 8-bit 0/100, 16-bit 0/1000 (1000 / 65535 of the range)
    Image.fromarray((polyp * 100).astype(np.uint8)).save(tmp_path / "m100.png")
    Image.fromarray((polyp * 1000).astype(np.uint16)).save(tmp_path / "m1000.png")
    for name, top in (("m100.png", 100), ("m1000.png", 4)):
        with pytest.raises(DataError, match=rf"{name}: mask values are 0 to {top} \(of 255\).*{FIX}"):
            read_mask_report(tmp_path / name)


@pytest.mark.parametrize("value,fragment", [(100, "mask values are 0 to 100"), (0, "all 3 masks are empty")],
                         ids=["0-100", "empty"])
def test_evaluate_stops_on_a_test_set_without_polyp(small_root, tmp_path, capfd, value, fragment):
    masks = _rescale(small_root / "TestDataset" / "Kvasir" / "masks", value)
    out = tmp_path / "eval"
    code, _, err = run_cli("polypsam.evaluate", "model=tiny", f"data.root={small_root}", f"hydra.run.dir={out}",
                           f"paths.root_dir={tmp_path}", "figures=false", "robustness.noise=[]",
                           "data.num_workers=0", capfd=capfd)
    assert_one_error(code, err, "test set Kvasir", masks[0], fragment)
    assert not any((out / f).exists() for f in ("per_image.csv", "summary.csv", "meta.json", "masks"))


def test_one_empty_frame_in_a_normal_set_is_scored_as_before(small_root, tmp_path, capfd):
    """The rule is about sets and mis-scaled files: a polyp-free frame among others keeps its documented score
    (docs/evaluation.md); this fails if every empty mask were refused."""
    empty = sorted((small_root / "TestDataset" / "Kvasir" / "masks").iterdir())[0]
    Image.fromarray(np.zeros(np.asarray(Image.open(empty)).shape[:2], np.uint8)).save(empty)
    out = tmp_path / "eval"
    code, _, err = run_cli("polypsam.evaluate", "model=tiny", f"data.root={small_root}", f"hydra.run.dir={out}",
                           f"paths.root_dir={tmp_path}", "figures=false", "robustness.noise=[]",
                           "data.num_workers=0", capfd=capfd)
    assert code == 0, err[-3000:]
    rows = pd.read_csv(out / "per_image.csv")
    row = rows[rows["image"] == empty.stem].iloc[0]
    assert row["status"] == "ok" and row["n_prompts"] == 0 and row["dice"] == 1.0  # EMPTY_GT_CONVENTION
    assert len(rows) == 6 and (rows["status"] == "ok").all()


def test_training_stops_before_it_fits_when_its_final_evaluation_would(small_root, tmp_path, capfd):
    """Without the check at the start of ``train``, the run trains, then its evaluation stops (a checkpoint
    exists); without the rule at all it ends with Dice 1 on Kvasir and exit status 0."""
    masks = _rescale(small_root / "TestDataset" / "Kvasir" / "masks", 100)
    run = tmp_path / "run"
    args = [a for a in TRAIN if a != "test_after_training=false"]
    code, _, err = run_cli("polypsam.train", *args, f"data.root={small_root}", f"paths.root_dir={tmp_path}",
                           f"hydra.run.dir={run}", f"data.embedding_cache.dir={tmp_path / 'cache'}", capfd=capfd)
    assert_one_error(code, err, "test set Kvasir", masks[0], FIX)
    assert not (run / "checkpoints").exists() and not (run / "results.json").exists()


def _source(real_root: Path, tmp: Path, value: int | None) -> Path:
    """A source folder of three real Kvasir pairs in PraNet's layout, masks as 0/``value`` (None: as they are,
    with the first one empty)."""
    src = tmp / "src" / "TestDataset" / "Kvasir"
    real = real_root / "TestDataset" / "Kvasir"
    for sub in ("images", "masks"):
        (src / sub).mkdir(parents=True)
        for p in sorted((real / sub).iterdir())[:3]:
            shutil.copy(p, src / sub / p.name)
    if value is None:
        first = sorted((src / "masks").iterdir())[0]
        Image.fromarray(np.zeros(np.asarray(Image.open(first)).shape[:2], np.uint8)).save(first)
    else:
        _rescale(src / "masks", value)
    return tmp / "src"


@pytest.mark.parametrize("value,fragment", [(100, "mask values are 0 to 100"), (0, "all 3 masks are empty")],
                         ids=["0-100", "empty"])
def test_prepare_stops_before_writing_a_set_without_polyp(real_root, tmp_path, value, fragment):
    src = _source(real_root, tmp_path, value)
    out = tmp_path / "data"
    rc, _, err = _run([src, "--out", out])
    assert rc == 2 and err.count("\n") == 1, err
    first = sorted((src / "TestDataset" / "Kvasir" / "masks").iterdir())[0]
    for f in ("TestDataset/Kvasir: ", str(first), fragment):
        assert f in err, (f, err)
    assert not out.exists()  # nothing written, no report with a count of thresholded pixels


def test_prepare_keeps_an_empty_frame_in_a_normal_set(real_root, tmp_path):
    src = _source(real_root, tmp_path, None)
    rc, _, err = _run([src, "--out", tmp_path / "data"])
    assert rc == 0, err
    masks = sorted((tmp_path / "data" / "TestDataset" / "Kvasir" / "masks").iterdir())
    assert len(masks) == 3 and not read_mask(masks[0]).any() and read_mask(masks[1]).any()
