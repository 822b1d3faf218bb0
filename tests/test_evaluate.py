"""Evaluation: resolution mapping, prompts, tables, bad input, and the CLI end to end (tiny and real data).

The metric formulas themselves are tested by hand-computed cases in test_metrics.py; here we test what the
evaluation does with them.
"""

import csv
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import warm
from polypsam.compare import main as compare_main
from polypsam.config import CONF_DIR
from polypsam.errors import CheckpointError, ConfigError, DataError
from polypsam.evaluation import FAILURE_SCORES, METRICS, EvalResult, EvalSettings, evaluate, evaluate_model
from polypsam.evaluation.report import our_table2_rows, summary_markdown
from polypsam.geometry import resize_image, resize_mask, to_original
from polypsam.metrics import dice_iou, score_image
from polypsam.models import build_model
from polypsam.reporting import tables as rep

REPO = Path(__file__).resolve().parents[1]


def _env(tmp: Path, **extra) -> dict:
    # W&B keeps staged artifacts and settings under HOME unless told otherwise: keep them in tmp
    wandb_dirs = {f"WANDB_{k}_DIR": str(tmp / f"wandb-{k.lower()}") for k in ("DATA", "CACHE", "CONFIG")}
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
            "NO_ALBUMENTATIONS_UPDATE": "1", **wandb_dirs, **extra}


def run_cli(module: str, *args, tmp: Path, check=True, **env):
    proc = warm.run(module, *args, cwd=REPO, env=_env(tmp, **env), timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def ellipse(h, w, cy, cx, ay, ax, angle=20.0) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    cv2.ellipse(m, (int(cx), int(cy)), (int(ax), int(ay)), angle, 0, 360, 1, -1)
    return m.astype(bool)


def write_pair(folder: Path, name: str, h: int, w: int, rng, empty=False, corrupt=False) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    mask = np.zeros((h, w), bool) if empty else ellipse(h, w, h * rng.uniform(0.35, 0.65),
                                                         w * rng.uniform(0.35, 0.65), h * 0.2, w * 0.25)
    img = rng.normal(120, 20, (h, w, 3)) + mask[..., None] * np.array([60, 10, 20])
    img = img.clip(0, 255).astype(np.uint8)
    if corrupt:
        (folder / "images" / f"{name}.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG body")
    else:
        Image.fromarray(img).save(folder / "images" / f"{name}.jpg", quality=95)
    Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / f"{name}.png")


def make_root(root: Path) -> Path:
    """PraNet layout with odd sizes, a non-standard test folder, an empty mask and an unreadable image."""
    rng = np.random.default_rng(0)
    for i in range(12):
        write_pair(root / "TrainDataset", f"t{i:02d}", 60 + 2 * i, 80 - i, rng)
    for i, (h, w) in enumerate([(67, 93), (93, 67), (121, 101)]):
        write_pair(root / "TestDataset" / "Kvasir", f"k{i}", h, w, rng)
    write_pair(root / "TestDataset" / "CVC-300", "c0", 75, 75, rng)
    write_pair(root / "TestDataset" / "CVC-300", "c1_empty", 75, 91, rng, empty=True)
    write_pair(root / "TestDataset" / "My-Clinic", "m0", 59, 83, rng)
    write_pair(root / "TestDataset" / "My-Clinic", "m1", 83, 59, rng)
    write_pair(root / "TestDataset" / "My-Clinic", "m2_broken", 59, 83, rng, corrupt=True)
    return root


# ------------------------------------------------------------------------------------ resolution mapping


@pytest.mark.parametrize("hw,size", [((256, 171), 256), ((171, 256), 256), ((333, 517), 256),
                                     ((517, 333), 256), ((101, 67), 256), ((37, 53), 64), ((531, 622), 1024)])
def test_prediction_equal_to_gt_at_input_resolution_maps_back_to_dice_one(hw, size):
    """The GT resized to the input canvas (what a perfect model outputs there) is mapped back with the same
    crop + bilinear resize the evaluation uses (to_original) and thresholded at 0.5.

    Tolerance: exactly 1 when no resize happens (longest side == canvas); otherwise Dice >= 0.985, the loss
    of two resamplings along the boundary of a polyp-sized ellipse (measured 0.99+). A mapping that forgets
    to crop the padding falls far below, so the test can fail.
    """
    h, w = hw
    gt = ellipse(h, w, h * 0.45, w * 0.55, h * 0.25, w * 0.3)
    _, rz = resize_image(np.zeros((h, w, 3), np.uint8), size)
    at_input = torch.from_numpy(resize_mask(gt, rz).astype(np.float32))  # padded (S,S) canvas
    back = to_original(at_input, rz).numpy()
    assert back.shape == (h, w)
    d = dice_iou(back > 0.5, gt)[0]
    if max(h, w) == size:
        assert d == 1.0
    else:
        assert d >= 0.985, d
    # negative control: resizing the whole padded canvas (no crop) misplaces the polyp
    wrong = torch.nn.functional.interpolate(at_input[None, None], size=(h, w), mode="bilinear")[0, 0].numpy()
    if (h, w) != (size, size) and rz.input_hw != (size, size):
        assert dice_iou(wrong > 0.5, gt)[0] < 0.9


# -------------------------------------------------------------------------------------- tables / compat


def test_compat_mode_reports_per_row_dice_apart_from_per_image_dice():
    """On shifted masks the Polyp-SAM per-row metric differs from per-image Dice; the compat option adds it
    to the table as its own labelled row and never replaces the headline."""
    rows = []
    for shift in (3, 6, 9):
        gt = ellipse(96, 128, 48, 64, 20, 30, angle=0)
        pred = np.roll(gt, shift, axis=1).astype(np.float32)
        s = score_image(pred, gt)
        assert abs(s["row_dice"] - s["dice"]) > 0.01
        rows.append({"dataset": "Kvasir", "status": "ok", "image": f"i{shift}", **s})
    per = pd.DataFrame(rows)
    from polypsam.metrics import summarize

    st = summarize(per[list(METRICS)].to_dict("records"), keys=METRICS)
    summary = pd.DataFrame([{"dataset": "Kvasir", "n_images": 3, "n_unreadable": 0, **st, "unreadable": ""}])
    meta = {"label": "x zero-shot", "model": "x", "strategy": "zero-shot", "split": "none",
            "checkpoint": None, "data_root": "/d", "n_images": 3, "limit_test": None, "threshold": 0.5, "n_unreadable": 0,
            "prompt": {"description": "oracle", "seed": 0, "mode": "tight"}}
    res = EvalResult(Path("."), summary, per, None, meta, {})
    default, compat = summary_markdown(res), summary_markdown(res, compat_row_dice=True)
    headline = f"| **x zero-shot (ours, per-image Dice/IoU @0.5)** | {st['dice']:.3f} | {st['iou']:.3f} |"
    assert headline in default and headline in compat
    assert "Polyp-SAM compat" not in default
    compat_row = f"| x zero-shot (ours, Polyp-SAM compat: MONAI per-row Dice/IoU) | {st['row_dice']:.3f} |"
    assert compat_row in compat and f"{st['row_dice']:.3f}" != f"{st['dice']:.3f}"
    assert f"Kvasir {st['row_dice'] - st['dice']:+.3f}" in compat
    labels = [label for label, _ in our_table2_rows(summary, "x", compat_row_dice=True)]
    assert len(labels) == 3 and "per-image" in labels[0]


def test_table2_quoted_rows_and_layout():
    md = rep.table2_markdown([("ours", {"Kvasir": (0.9, 0.8), "Extra": (0.5, 0.4)})])
    lines = md.splitlines()
    assert lines[0].startswith("| Method | Kvasir |  | ClinicDB |  | ColonDB |  | CVC-300 |  | ETIS |  | "
                               "Extra |")
    assert lines[2] == "|  | " + " | ".join(["DSC", "mIoU"] * 6) + " |"
    for name in ("U-Net", "Polyp-PVT", "HSNet", "Polyp-SAM-B", "Polyp-SAM-L"):
        assert sum(line.startswith(f"| {name} (quoted") for line in lines) == 1
    assert "| Polyp-SAM-B (quoted; MONAI per-row Dice) | 0.902 | n/a | 0.921 | n/a |" in md
    assert "| ours | 0.900 | 0.800 | – | – | – | – | – | – | – | – | 0.500 | 0.400 |" in md


# ------------------------------------------------------------------------------------------ bad input


def _tiny_settings(**kw):
    return EvalSettings(noise=(), figures=False, save_masks=False, **kw)


def test_bad_data_gives_clear_errors(tmp_path):
    net = build_model("tiny", pretrained=False)
    rng = np.random.default_rng(1)
    root = tmp_path / "r1"
    write_pair(root / "TestDataset" / "Kvasir", "a", 40, 50, rng)
    (root / "TestDataset" / "NoMasks" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match=r"NoMasks/masks: the masks folder does not exist"):
        evaluate_model(net, root, tmp_path / "o1", _tiny_settings(), verbose=False)

    root = tmp_path / "r2"
    write_pair(root / "TestDataset" / "Kvasir", "a", 40, 50, rng)
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(root / "TestDataset/Kvasir/images/lonely.png")
    with pytest.raises(DataError, match=r"images without a mask .*lonely\.png.*Add the missing partners"):
        evaluate_model(net, root, tmp_path / "o2", _tiny_settings(), verbose=False)

    root = tmp_path / "r3"
    write_pair(root / "TestDataset" / "Kvasir", "a", 40, 50, rng)
    Image.fromarray(np.zeros((41, 50), np.uint8)).save(root / "TestDataset" / "Kvasir" / "masks" / "a.png")
    with pytest.raises(DataError, match=r"masks/a\.png: mask is 50x41 but its image .*a\.jpg is 50x40"):
        evaluate_model(net, root, tmp_path / "o3", _tiny_settings(), verbose=False)

    with pytest.raises(DataError, match="no test sets found"):
        (tmp_path / "r4" / "TrainDataset").mkdir(parents=True)
        evaluate_model(net, tmp_path / "r4", tmp_path / "o4", _tiny_settings(), verbose=False)


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("eval", overrides=list(overrides))


@pytest.mark.slow  # a subprocess or a training run
def test_bad_checkpoints_and_missing_model(tmp_path, tiny_run):
    _, run, _, _ = tiny_run
    common = [f"paths.output_dir={tmp_path / 'o'}", f"data.root={tmp_path / 'none'}"]
    with pytest.raises(CheckpointError, match=r"best\.ckpt: checkpoint is for model 'tiny', but model='lite"):
        evaluate(_compose(f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}", "model=lite", *common))
    foreign = tmp_path / "sam_like.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match=r"sam_like\.pth: not a polypsam training checkpoint.*SAM"):
        evaluate(_compose(f"ckpt_path={foreign}", *common))
    with pytest.raises(ConfigError, match="nothing to evaluate: give ckpt_path=.* or model=<name>"):
        evaluate(_compose(*common))


# ------------------------------------------------------------------------------------- end to end: tiny


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny-model run trained by the real CLI (its training ends with the evaluation), then the evaluate CLI
    on its best checkpoint with the jitter prompt, compat mode and W&B offline."""
    tmp = tmp_path_factory.mktemp("eval_e2e")
    root = make_root(tmp / "root")
    run = tmp / "run"
    run_cli("polypsam.train", "+experiment=tiny", "data=pranet", f"data.root={root}", "data.num_workers=0",
            "data.pin_memory=false", "data.limit_train=null", "data.limit_val=null", "data.limit_test=null",
            f"paths.root_dir={tmp}", f"data.embedding_cache.dir={tmp / 'cache'}", f"hydra.run.dir={run}",
            tmp=tmp)
    ev = tmp / "ev"
    proc = run_cli("polypsam.evaluate", f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}", f"data.root={root}",
                   "data.num_workers=0", "prompt.jitter_frac=0.1",
                   "compat_row_dice=true", "logger=wandb", f"paths.root_dir={tmp}", f"hydra.run.dir={ev}",
                   tmp=tmp, WANDB_MODE="offline")
    return root, run, ev, proc


@pytest.fixture(scope="module")
def tiny_eval(tiny_run):
    root, run, ev, _ = tiny_run
    return root, run, ev


def _check_outputs(ev: Path, root: Path):
    per = pd.read_csv(ev / "per_image.csv")
    summary = pd.read_csv(ev / "summary.csv")
    # every folder, whatever its name, in the paper's order then alphabetically
    assert summary["dataset"].tolist() == ["Kvasir", "CVC-300", "My-Clinic"]
    assert summary["n_images"].tolist() == [3, 2, 3]
    for col in ("dataset", "image", "height", "width", "box", *METRICS):
        assert col in per.columns
    for r in per[per["status"] == "ok"].to_dict("records"):
        m = np.asarray(Image.open(ev / r["pred_mask"]))
        assert m.shape == (r["height"], r["width"]) and set(np.unique(m)) <= {0, 255}
        src = root / "TestDataset" / r["dataset"] / "images" / f"{r['image']}.jpg"
        assert Image.open(src).size == (r["width"], r["height"])  # original resolution
    # unreadable: kept, listed, scored as a total failure, counted in the mean
    bad = per[per["status"] == "unreadable"]
    assert bad["image"].tolist() == ["m2_broken"]
    assert all(bad.iloc[0][k] == v for k, v in FAILURE_SCORES.items())
    my = summary.set_index("dataset").loc["My-Clinic"]
    assert my["n_unreadable"] == 1 and my["unreadable"] == "m2_broken"
    assert my["dice"] == pytest.approx(per[per["dataset"] == "My-Clinic"]["dice"].mean())
    # empty ground truth: no box, empty prediction, the documented Dice 1
    empty = per[per["image"] == "c1_empty"].iloc[0]
    assert empty["n_prompts"] == 0 and empty["dice"] == 1.0 and pd.isna(empty["box"])
    for s in ("Kvasir", "CVC-300", "My-Clinic"):
        assert (ev / "figures" / f"{s}.png").stat().st_size > 1000
    assert (ev / "robustness.png").is_file()
    rob = pd.read_csv(ev / "robustness.csv")
    assert sorted(rob["noise"].unique()) == [0.0, 0.05, 0.1, 0.2] and len(rob) == 12
    md = (ev / "summary.md").read_text()
    assert "| Method | Kvasir |  | ClinicDB |" in md and "U-Net (quoted" in md and "HSNet (quoted" in md
    assert "My-Clinic/m2_broken" in md and "Unreadable images" in md
    return per, summary, md


@pytest.mark.slow  # reads the CLI runs of tiny_run (two subprocesses)
def test_training_ends_with_the_evaluation(tiny_eval):
    root, run, _ = tiny_eval
    per, summary, _ = _check_outputs(run / "eval", root)
    results = json.loads((run / "results.json").read_text())
    assert results["eval_dir"] == str(run / "eval")
    assert results["test"]["test/Kvasir/dice"] == pytest.approx(summary.loc[0, "dice"])
    meta = json.loads((run / "eval" / "meta.json").read_text())
    assert meta["checkpoint"] == str((run / "checkpoints" / "best.ckpt").resolve())
    assert meta["strategy"] == "enc_dec" and meta["model"] == "tiny"
    assert meta["prompt"]["mode"] == "tight"
    assert per["dice"].tolist() == per["dice_noise_0"].tolist()  # the oracle box is the sweep's 0 point


@pytest.mark.slow  # reads the CLI runs of tiny_run (two subprocesses)
def test_evaluate_cli_writes_every_output(tiny_eval, tiny_run):
    root, run, ev = tiny_eval
    per, _, md = _check_outputs(ev, root)
    ok = per[per["status"] == "ok"]
    # jitter prompt = the sweep point at the same noise (same seeded draw), and differs from the oracle box
    assert np.allclose(ok["dice"], ok["dice_noise_0.1"])
    oracle = pd.read_csv(run / "eval" / "per_image.csv").set_index("image")["box"]
    assert any(b != oracle[i] for i, b in zip(ok["image"], ok["box"]) if isinstance(b, str))
    assert "Polyp-SAM compat: MONAI per-row" in md and "jittered (each side" in md
    assert "Polyp-SAM compat" not in (run / "eval" / "summary.md").read_text()  # never the default
    # W&B, offline: the summary, per-image table with masks, and the figures were logged
    runs = list((ev / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = runs[0] / "files" / "media"
    tables = {p.name.split("_")[0] for p in (media / "table" / "eval").glob("*.table.json")}
    assert {"summary", "per"} <= tables
    per_table = json.loads(next((media / "table" / "eval").glob("per_image_*.table.json")).read_text())
    assert len(per_table["data"]) == len(per) and "overlay" in per_table["columns"]
    assert {p.name.split("_")[0] for p in (media / "images" / "eval" / "figures").glob("*.png")} >= {
        "Kvasir", "CVC-300", "My-Clinic", "robustness"}
    assert b".mask.png" in next(runs[0].glob("run-*.wandb")).read_bytes()  # the per-image masks


@pytest.mark.slow  # reads the CLI runs of tiny_run (two subprocesses)
def test_compare_merges_runs(tiny_eval, tmp_path, capsys):
    _, run, ev = tiny_eval
    assert compare_main([str(run), str(ev), "--out", str(tmp_path)]) == 0
    with open(tmp_path / "table.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["run"], r["strategy"], r["prompt"]) for r in table] == [("run", "enc_dec", "box"),
                                                                        ("ev", "enc_dec", "box jitter 0.1")]
    assert float(table[1]["Kvasir DSC"]) == pytest.approx(pd.read_csv(ev / "summary.csv").loc[0, "dice"])
    md = (tmp_path / "table.md").read_text()
    assert "| run | backbone | strategy | split | prompt | Kvasir |  | CVC-300 |  | My-Clinic |" in md
    assert compare_main([str(tmp_path / "nothing")]) == 2
    assert "no evaluation found" in capsys.readouterr().err
    assert compare_main([str(run), str(ev), "--names", "boxed,jittered", "--out", str(tmp_path / "n")]) == 0
    assert pd.read_csv(tmp_path / "n" / "table.csv")["run"].tolist() == ["boxed", "jittered"]
    assert compare_main([str(run), str(ev), "--names", "one"]) == 2
    assert "give one per directory" in capsys.readouterr().err


@pytest.mark.slow  # a subprocess or a training run
def test_cli_bad_input_is_one_line(tiny_run, tmp_path):
    root, run, _, _ = tiny_run
    proc = run_cli("polypsam.evaluate", f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}", "model=lite",
                   f"data.root={root}", f"hydra.run.dir={tmp_path / 'x'}", tmp=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: " in proc.stderr and "checkpoint is for model 'tiny'" in proc.stderr


# ------------------------------------------------------------------------------- end to end: real data


@pytest.mark.slow
def test_lite_zero_shot_on_real_test_sets(real_root, tmp_path):
    """LiteMedSAM zero-shot through the documented command, on a seeded subset (data.limit_test=8 per set;
    the full 100 images cost ~5-8 min on this CPU, see docs/evaluation.md). This proves the real preprocessing
    (RGB, resize-longest-side, min-max, bottom-right pad), prompts and weights are wired right: ~0.95 when they
    are, far less when any of them is off."""
    ev = tmp_path / "lite"
    run_cli("polypsam.evaluate", "model=lite", f"data.root={real_root}",
            "data.limit_test=8", "data.num_workers=0", f"paths.root_dir={tmp_path}", f"hydra.run.dir={ev}",
            tmp=tmp_path)
    summary = pd.read_csv(ev / "summary.csv")
    assert summary["dataset"].tolist() == ["Kvasir", "CVC-ClinicDB"]
    assert summary["n_images"].tolist() == [8, 8]
    md = (ev / "summary.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| **lite zero-shot (ours"))
    dices = [float(c) for c in row.split("|")[2:6:2]]  # Kvasir DSC, ClinicDB DSC
    assert dices == pytest.approx(summary["dice"].round(3).tolist(), abs=1e-9)
    assert all(d >= 0.85 for d in dices), dices
    rob = pd.read_csv(ev / "robustness.csv")
    assert len(rob) == 8 and (rob["dice"] > 0.5).all()


@pytest.mark.slow  # a subprocess
def test_evaluate_cli_with_clicks(tiny_run):
    """prompt=point in the evaluation command: clicks from each ground truth, recorded per image; no noise
    sweep (clicks have no noise axis), and the same images and metrics as with boxes."""
    root, run, ev_box, _ = tiny_run
    tmp = ev_box.parent
    ev = tmp / "ev_points"
    run_cli("polypsam.evaluate", f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}", f"data.root={root}",
            "data.num_workers=0", "prompt=point", "prompt.num_positive=2", "prompt.num_negative=1",
            "figures=false", f"hydra.run.dir={ev}", tmp=tmp)
    per = pd.read_csv(ev / "per_image.csv")
    assert per[["dataset", "image", "status"]].equals(pd.read_csv(ev_box / "per_image.csv")[["dataset", "image", "status"]])
    assert (per["n_prompts"] == (per["status"] == "ok") * (per["image"] != "c1_empty")).all()  # one click set each
    ok = per[per["status"] == "ok"]
    clicks = [c for c in ok["box"] if isinstance(c, str)]
    assert clicks and all(len(c.split(";")) == 3 and c.endswith(",0") for c in clicks)  # 2 inside, 1 outside
    assert not (ev / "robustness.csv").exists()
    meta = json.loads((ev / "meta.json").read_text())
    assert meta["prompt"]["type"] == "point" and meta["prompt"]["label"] == "point 2+1"
