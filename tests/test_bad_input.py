"""Bad input through the real command lines (train, predict, evaluate): each is one ``error:`` line that
names the file, exit status 2 and no traceback, or a counted and reported skip. The lower-level checks
have their own unit tests (test_data.py); here the whole path from the command line is exercised.

Most cases call each CLI's ``main()`` in this process with ``sys.argv`` set (the same code as
``python -m ...`` minus interpreter start-up); two run as real subprocesses (loader worker processes,
and a full training run whose data root must come out byte-identical).
"""

import hashlib
import importlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

# imported here, outside any one test's output capture: Lightning's log handler keeps the stream it was
# created with, and a test's capture is closed when the test ends
import polypsam.evaluate  # noqa: F401
import polypsam.predict  # noqa: F401
import polypsam.train  # noqa: F401
import warm
from polypsam.config import CONF_DIR
from polypsam.geometry import box_from_mask

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["+experiment=tiny", "data=pranet", "data.num_workers=0", "data.limit_train=null", "data.limit_val=null",
         "test_after_training=false", "callbacks.rich_progress_bar=null", "callbacks.val_overlays=null"]


def run_cli(module: str, *args: str, capfd) -> tuple[int, str, str]:
    mod = importlib.import_module(module)
    # Hydra's logging setup would bind handlers to this test's capture, which closes when the test ends
    saved, sys.argv = sys.argv, [module, *map(str, args), "hydra/job_logging=none", "hydra/hydra_logging=none"]
    code = 0
    try:
        mod.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    out, err = capfd.readouterr()
    return code, out, err


def assert_one_error(code: int, err: str, *fragments) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for f in fragments:
        assert str(f) in lines[0], (f, lines[0])
    return lines[0]


def _train_cli(root: Path, tmp: Path, *extra, capfd):
    return run_cli("polypsam.train", *TRAIN, f"data.root={root}", f"paths.root_dir={tmp}",
                   f"hydra.run.dir={tmp / 'run'}", f"data.embedding_cache.dir={tmp / 'cache'}", *extra, capfd=capfd)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:3000])


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A real tiny training checkpoint (one epoch on the synthetic set, through ``train``)."""
    from polypsam.train import train

    tmp = tmp_path_factory.mktemp("bad_input_ckpt")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=tiny", f"paths.root_dir={tmp}", f"paths.output_dir={tmp / 'run'}",
                                          "validate_before_training=false", "test_after_training=false",
                                          "callbacks.rich_progress_bar=null", "callbacks.val_overlays=null",
                                          "data.limit_train=4", "data.limit_val=2"])
    train(cfg)
    return tmp / "run" / "checkpoints" / "best.ckpt"


# -- train --------------------------------------------------------------------------------------------------


def _first(root: Path, kind: str) -> Path:
    return sorted((root / "TrainDataset" / kind).iterdir())[0]


def _break_truncated(root):
    p = _first(root, "images")
    _truncate(p)
    return p.name


def _break_zero_byte(root):
    p = _first(root, "images")
    p.write_bytes(b"")
    return p.name


def _break_not_an_image(root):
    p = _first(root, "images")
    p.write_text("patient notes, not a picture\n")
    return p.name


def _break_mask_size(root):
    p = _first(root, "masks")
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(p)
    return p.name


def _break_unpaired(root):
    m = _first(root, "masks")
    shutil.copy(m, m.with_name("orphan.png"))
    m.unlink()
    return "orphan.png"


def _break_duplicate_stem(root):
    p = _first(root, "images")
    shutil.copy(p, p.with_suffix(".png"))
    return p.with_suffix(".png").name


@pytest.mark.parametrize("breakage", [_break_truncated, _break_zero_byte, _break_not_an_image, _break_mask_size,
                                      _break_unpaired, _break_duplicate_stem], ids=lambda f: f.__name__[7:])
def test_train_data_errors(small_root, tmp_path, capfd, breakage):
    name = breakage(small_root)
    code, _, err = _train_cli(small_root, tmp_path, capfd=capfd)
    line = assert_one_error(code, err, name)
    if breakage is _break_unpaired:
        assert "images without a mask" in line and "masks without an image in" in line


def test_train_truncated_image_in_a_loader_worker(small_root, tmp_path):
    """A worker's error reaches the command line as the original one line, not torch's wrapped traceback."""
    for p in sorted((small_root / "TrainDataset" / "images").iterdir()):
        _truncate(p)  # whichever image a worker reads first
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = warm.run("polypsam.train", *TRAIN, f"data.root={small_root}", f"paths.root_dir={tmp_path}",
                    f"hydra.run.dir={tmp_path / 'run'}", "data.num_workers=2", cwd=REPO, env=env, timeout=600)
    line = assert_one_error(proc.returncode, proc.stderr, str(small_root / "TrainDataset" / "images"),
                            "cannot decode image")
    assert "DataLoader worker" not in line


def test_train_checkpoint_errors(small_root, tmp_path, tiny_ckpt, capfd):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(tiny_ckpt.read_bytes()[:5000])
    code, _, err = _train_cli(small_root, tmp_path, f"ckpt_path={corrupt}", capfd=capfd)
    assert_one_error(code, err, corrupt, "corrupt or truncated")
    code, _, err = _train_cli(small_root, tmp_path, f"ckpt_path={tiny_ckpt}", "model=lite", capfd=capfd)
    assert_one_error(code, err, tiny_ckpt, "checkpoint is for model 'tiny', but this run is model='lite'")
    code, _, err = _train_cli(small_root, tmp_path, f"resume={tmp_path / 'no_such_run'}", capfd=capfd)
    assert_one_error(code, err, tmp_path / "no_such_run", "run directory not found")


def test_unknown_config_key_is_hydras_message(tmp_path, capfd):
    code, _, err = run_cli("polypsam.train", "+experiment=tiny", "trainer.max_epoch=3", capfd=capfd)
    assert code == 1 and "max_epoch" in err and "Traceback" not in err
    code, _, err = run_cli("polypsam.predict", "model=tiny", f"input={tmp_path}", "prompts_dir=x", capfd=capfd)
    assert code == 1 and "prompts_dir" in err and "Traceback" not in err


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() + f":{p.stat().st_mtime_ns}"
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_training_reads_the_data_root_and_never_writes_it(small_root, tmp_path):
    """Empty and non-binary masks in training and test data; the data root is byte-for-byte unchanged."""
    train_masks = sorted((small_root / "TrainDataset" / "masks").iterdir())
    Image.fromarray(np.zeros(np.asarray(Image.open(train_masks[0])).shape[:2], np.uint8)).save(train_masks[0])
    m = np.asarray(Image.open(train_masks[1]).convert("L")).copy()
    m[m > 127] = 200  # a mask of 0/200 plus mid-grey edge pixels: thresholded at > 127
    m[:3, :3] = 90
    Image.fromarray(m).save(train_masks[1])
    test_mask = sorted((small_root / "TestDataset" / "Kvasir" / "masks").iterdir())[0]
    Image.fromarray(np.zeros(np.asarray(Image.open(test_mask)).shape[:2], np.uint8)).save(test_mask)
    before = _tree_digest(small_root)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    args = [a for a in TRAIN if a != "test_after_training=false"] + [
        f"data.root={small_root}", f"paths.root_dir={tmp_path}", f"hydra.run.dir={run}",
        "+eval.figures=false", "+eval.robustness.noise=[]"]
    proc = warm.run("polypsam.train", *args, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _tree_digest(small_root) == before
    report = json.loads((run / "data_report.json").read_text())
    skipped = report["train"]["skipped_empty_mask"] + report["val"]["skipped_empty_mask"]
    assert skipped == [f"TrainDataset/images/{train_masks[0].stem}.jpg"]
    per_image = pd.read_csv(run / "eval" / "per_image.csv")
    row = per_image[per_image["image"] == test_mask.stem].iloc[0]
    # metrics.EMPTY_GT_CONVENTION: no box, an empty prediction, Dice = IoU = 1 (a correct rejection)
    assert row["n_prompts"] == 0 and row["dice"] == 1.0 and row["iou"] == 1.0


# -- predict ------------------------------------------------------------------------------------------------


def _kvasir(real_root, n):
    d = real_root / "TestDataset" / "Kvasir"
    return [(p, next((d / "masks").glob(p.stem + ".*"))) for p in sorted((d / "images").iterdir())[:n]]


def test_predict_skips_and_counts(real_root, tmp_path, capfd):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    pairs = _kvasir(real_root, 6)
    for img, m in pairs:
        shutil.copy(img, images / img.name)
        shutil.copy(m, masks / m.name)
    _truncate(images / pairs[0][0].name)
    (images / pairs[1][0].name).write_bytes(b"")
    (images / pairs[2][0].name).write_text("not an image")
    (masks / pairs[3][1].name).unlink()  # an image without a prompt
    shutil.copy(pairs[3][1], masks / "lonely.png")  # a prompt without an image
    empty = np.zeros(np.asarray(Image.open(pairs[4][1])).shape[:2], np.uint8)
    Image.fromarray(empty).save(masks / pairs[4][1].name)  # empty prompt mask
    mask = np.asarray(Image.open(pairs[5][1]).convert("L")).copy()
    mask[mask > 127] = 180
    mask[:2, :5] = 60
    Image.fromarray(mask).save(masks / pairs[5][1].name)  # non-binary prompt mask (0/180, a few 60)
    nonbinary = int(np.count_nonzero((mask != 0) & (mask != 255)))
    assert nonbinary > 1000
    out = tmp_path / "out"
    code, stdout, err = run_cli("polypsam.predict", "model=tiny", f"input={images}", f"prompts={masks}",
                                f"output={out}", "num_workers=1", capfd=capfd)
    assert code == 0 and "Traceback" not in err, err[-3000:]
    assert "predicted 1 image(s)" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == {"unreadable": 3, "no_prompt": 1, "empty_prompt_mask": 1}
    assert summary["unused_prompts"] == ["lonely"]
    assert summary["prompt_mask_nonbinary_pixels"] == nonbinary
    rec = json.loads((out / "json" / f"{pairs[5][0].stem}.json").read_text())
    assert rec["prompt_mask_nonbinary_pixels"] == nonbinary
    assert rec["boxes"] == [box_from_mask(mask > 127).tolist()]  # thresholded at > 127 before the box
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 4
    unreadable = next(w for w in warnings if "unreadable" in w)
    for img, _ in pairs[:3]:
        assert img.name in unreadable
    assert sorted(p.name for p in (out / "masks").iterdir()) == [f"{pairs[5][0].stem}.png"]


def test_predict_errors(real_root, tmp_path, tiny_ckpt, capfd):
    (img, _), = _kvasir(real_root, 1)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(img.read_bytes()[:3000])
    cases = [
        ([f"input={bad}", "box=[1,1,50,50]"], [bad, "cannot decode image"]),  # one image: nothing else to do
        ([f"input={tmp_path / 'missing'}", "box=[1,1,50,50]"], [tmp_path / "missing", "does not exist"]),
        ([f"input={img}", "box=[100,100,700,200]"], [img, "outside the image (622x531 pixels)"]),
        ([f"input={img}", "box=[100,100,100,200]"], [img, "has zero area"]),
    ]
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(other / f"{img.stem}.png")
    cases.append(([f"input={img}", f"prompts={other}"], [other / f"{img.stem}.png", "mask is 40x30"]))
    dup = tmp_path / "dup"
    dup.mkdir()
    shutil.copy(img, dup / img.name)
    Image.open(img).save(dup / f"{img.stem}.png")
    cases.append(([f"input={dup}", f"prompts={dup}"], [f"{img.name} / {img.stem}.png", "share a stem"]))
    for args, fragments in cases:
        code, _, err = run_cli("polypsam.predict", "model=tiny", *args, f"output={tmp_path / 'o'}", capfd=capfd)
        assert_one_error(code, err, *fragments)
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(tiny_ckpt.read_bytes()[:4000])
    for args, fragments in [([f"ckpt_path={corrupt}"], [corrupt, "corrupt or truncated"]),
                            ([f"ckpt_path={tiny_ckpt}", "model=lite"], [tiny_ckpt, "checkpoint is for model 'tiny'"]),
                            ([f"ckpt_path={tmp_path / 'nope.ckpt'}"], [tmp_path / "nope.ckpt", "not found"])]:
        code, _, err = run_cli("polypsam.predict", *args, f"input={img}", "box=[1,1,50,50]",
                               f"output={tmp_path / 'o'}", capfd=capfd)
        assert_one_error(code, err, *fragments)


# -- evaluate -----------------------------------------------------------------------------------------------


def test_evaluate_errors_and_unreadable_test_image(small_root, tmp_path, tiny_ckpt, capfd):
    common = ["figures=false", "robustness.noise=[]", "data.num_workers=0", f"paths.root_dir={tmp_path}"]
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(tiny_ckpt.read_bytes()[:4000])
    code, _, err = run_cli("polypsam.evaluate", *common, f"ckpt_path={corrupt}", f"data.root={small_root}",
                           f"hydra.run.dir={tmp_path / 'e1'}", capfd=capfd)
    assert_one_error(code, err, corrupt)
    code, _, err = run_cli("polypsam.evaluate", *common, "model=tiny", f"data.root={tmp_path / 'nowhere'}",
                           f"hydra.run.dir={tmp_path / 'e2'}", capfd=capfd)
    assert_one_error(code, err, tmp_path / "nowhere")
    # a test image that cannot be decoded is kept and scored as a failure (evaluate's written convention)
    victim = sorted((small_root / "TestDataset" / "Kvasir" / "images").iterdir())[0]
    _truncate(victim)
    code, _, err = run_cli("polypsam.evaluate", *common, "model=tiny", f"data.root={small_root}",
                           f"hydra.run.dir={tmp_path / 'e3'}", capfd=capfd)
    assert code == 0, err[-3000:]
    per_image = pd.read_csv(tmp_path / "e3" / "per_image.csv")
    row = per_image[per_image["image"] == victim.stem].iloc[0]
    assert row["status"] == "unreadable" and row["dice"] == 0.0
