"""Prediction on real images: masks at the original size, overlays, one JSON per image; every prompt
format (masks folder, boxes.json, Kvasir-SEG's kavsir_bboxes.json, boxes.csv, box= on the command line)."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

import warm
from polypsam.config import CONF_DIR
from polypsam.data.io import read_image, read_mask
from polypsam.errors import ConfigError, DataError
from polypsam.geometry import box_from_mask, boxes_to_input, resize_image, to_original
from polypsam.metrics import dice_iou
from polypsam.prediction import load_boxes_csv, plan_jobs
from polypsam.prediction.command import predict
from polypsam.prompts.box import BoxPrompt
from polypsam.prompts.point import PointPrompt
from polypsam.training.checkpoints import load_model

REPO = Path(__file__).resolve().parents[1]


def _pairs(real_root, n, test_set="Kvasir"):
    d = real_root / "TestDataset" / test_set
    out = []
    for img in sorted((d / "images").iterdir())[:n]:
        out.append((img, next((d / "masks").glob(img.stem + ".*"))))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real tiny checkpoint: one epoch of the training entry's code on the synthetic set."""
    from polypsam.train import train

    tmp = tmp_path_factory.mktemp("predict_ckpt")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=tiny", f"paths.root_dir={tmp}", f"paths.output_dir={tmp / 'run'}",
                                          "validate_before_training=false", "test_after_training=false",
                                          "callbacks.rich_progress_bar=null", "callbacks.val_overlays=null",
                                          "data.limit_train=8", "data.limit_val=4"])
    train(cfg)
    return tmp / "run"


def _predict_cfg(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("predict", overrides=["num_workers=0", "progress=false", *overrides])


def test_cli_masks_folder_all_formats_on_real_images(real_root, trained, tmp_path):
    """JPEG, PNG, RGBA PNG, grayscale, 16-bit TIFF and BMP inputs of real images, masks as prompts."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    pairs = _pairs(real_root, 2) + _pairs(real_root, 1, "CVC-ClinicDB")
    for img, m in pairs:
        shutil.copy(img, images / img.name)
        shutil.copy(m, masks / m.name)
    rgb = read_image(pairs[0][0])
    mask0 = Image.open(pairs[0][1])
    variants = {
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)]), "RGBA"),
        "gray.png": Image.fromarray(rgb.mean(axis=2).astype(np.uint8), "L"),
        "deep.tif": Image.fromarray(rgb[..., 1].astype(np.uint16) * 257),
        "plain.bmp": Image.fromarray(rgb),
    }
    for name, im in variants.items():
        im.save(images / name)
        mask0.save(masks / (Path(name).stem + ".png"))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = warm.run("polypsam.predict", f"ckpt_path={trained}", f"input={images}", f"prompts={masks}",
                    f"output={out}", "batch_size=3", "num_workers=1", cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "predicted 7 image(s)" in proc.stdout and "predicting" in proc.stderr  # rich progress bar
    summary = json.loads((out / "summary.json").read_text())
    assert summary["predicted"] == 7 and summary["skipped"] == {} and summary["model"] == "tiny"
    assert summary["checkpoint"] == str(trained / "checkpoints" / "best.ckpt")  # a run dir means its best
    net, _ = load_model(trained / "checkpoints" / "best.ckpt")
    for img in sorted(images.iterdir()):
        rec = json.loads((out / "json" / f"{img.stem}.json").read_text())
        gt = read_mask(masks / f"{img.stem}.png")
        pred = np.asarray(Image.open(out / "masks" / f"{img.stem}.png"))
        assert pred.shape == gt.shape and set(np.unique(pred)) <= {0, 255}  # original size, 0/255
        assert Image.open(out / "overlays" / f"{img.stem}.jpg").size == (gt.shape[1], gt.shape[0])
        assert rec["boxes"] == [box_from_mask(gt).tolist()] and len(rec["predicted_iou"]) == 1
        assert rec["seconds"]["batch_size"] in (1, 3) and rec["seconds"]["total"] > 0
        if img.name == pairs[0][0].name:  # the batch gives what one image alone gives
            canvas, rz = resize_image(read_image(img), net.spec.image_size, net.spec.resize_method)
            with torch.inference_mode():
                logits, iou = net(torch.from_numpy(canvas).permute(2, 0, 1)[None], torch.tensor([rz.input_hw]),
                                  torch.from_numpy(boxes_to_input(box_from_mask(gt)[None], rz)), torch.tensor([0]))
            alone = torch.sigmoid(to_original(logits[0, 0], rz)).numpy() > 0.5
            assert np.mean(alone == (pred > 0)) > 0.999
            assert rec["predicted_iou"][0] == pytest.approx(iou.item(), abs=1e-3)
    # the conversions: RGBA and BMP are the same pixels as the JPEG's decode
    assert (np.asarray(Image.open(out / "masks" / "rgba.png")) == np.asarray(Image.open(out / "masks" / "plain.png"))).all()


def test_box_sources_agree_and_boxes_merge(real_root, tmp_path):
    (img, mask), = _pairs(real_root, 1)
    h, w = read_mask(mask).shape
    a, b = [20.0, 30.0, 250.0, 260.0], [300.0, 200.0, w - 1.0, h - 1.0]
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(img, folder / img.name)
    (tmp_path / "boxes.json").write_text(json.dumps({img.stem: [a]}))
    (tmp_path / "kavsir.json").write_text(json.dumps({img.stem: {"height": h, "width": w, "bbox": [
        {"label": "polyp", "xmin": a[0], "ymin": a[1], "xmax": a[2], "ymax": a[3]}]}}))
    (tmp_path / "two.csv").write_text(f"image,x0,y0,x1,y1\n{img.name},{','.join(map(str, a))}\n"
                                      f"{img.stem},{','.join(map(str, b))}\n")
    runs = {"json": [f"input={folder}", f"prompts={tmp_path / 'boxes.json'}"],
            "kavsir": [f"input={folder}", f"prompts={tmp_path / 'kavsir.json'}"],
            "cli": [f"input={img}", f"box=[{','.join(map(str, a))}]"],
            "b": [f"input={img}", f"box=[{','.join(map(str, b))}]"],
            "csv": [f"input={folder}", f"prompts={tmp_path / 'two.csv'}"]}
    masks = {}
    for name, args in runs.items():
        summary = predict(_predict_cfg("model=tiny", f"output={tmp_path / name}", "overlays=false", *args))
        assert summary["predicted"] == 1
        masks[name] = np.asarray(Image.open(tmp_path / name / "masks" / f"{img.stem}.png")) > 0
    assert (masks["json"] == masks["kavsir"]).all() and (masks["json"] == masks["cli"]).all()
    # several boxes of one image: one mask, the max of their logits (the union of their masks, up to the
    # upsampling of the low-resolution logits), as one forward pass with both boxes gives it
    from polypsam.models import build_model

    net = build_model("tiny").eval()
    canvas, rz = resize_image(read_image(img), net.spec.image_size, net.spec.resize_method)
    with torch.inference_mode():
        logits, _ = net(torch.from_numpy(canvas).permute(2, 0, 1)[None], torch.tensor([rz.input_hw]),
                        torch.from_numpy(boxes_to_input(np.array([a, b], np.float32), rz)), torch.tensor([0, 0]))
    both = torch.sigmoid(to_original(logits[0, 0], rz)).numpy() > 0.5
    assert np.mean(masks["csv"] == both) > 0.999
    assert np.mean(masks["csv"] == (masks["cli"] | masks["b"])) > 0.95
    assert masks["csv"].sum() > max(masks["cli"].sum(), masks["b"].sum())
    rec = json.loads((tmp_path / "csv" / "json" / f"{img.stem}.json").read_text())
    assert rec["boxes"] == [a, b] and len(rec["predicted_iou"]) == 2 and rec["zero_shot"] is True
    assert not (tmp_path / "csv" / "overlays").exists()


def test_per_component_boxes_from_masks(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "m").mkdir()
    Image.fromarray(np.full((80, 120, 3), 128, np.uint8)).save(tmp_path / "in" / "two.png")
    m = np.zeros((80, 120), np.uint8)
    m[5:20, 5:30] = 255
    m[40:70, 60:110] = 255
    Image.fromarray(m).save(tmp_path / "m" / "two.png")
    tight = plan_jobs(tmp_path / "in", tmp_path / "m")
    per = plan_jobs(tmp_path / "in", tmp_path / "m", prompt=BoxPrompt(mode="per_component"))
    clicks = plan_jobs(tmp_path / "in", tmp_path / "m", prompt=PointPrompt(num_positive=2))
    assert tight.jobs[0].boxes.tolist() == [[5, 5, 109, 69]]
    assert per.jobs[0].boxes.tolist() == [[60, 40, 109, 69], [5, 5, 29, 19]]  # largest first
    assert clicks.jobs[0].boxes is None and clicks.jobs[0].prompts.points.shape == (1, 2, 2)
    assert m[tuple(clicks.jobs[0].prompts.points[0, :, ::-1].astype(int).T)].all()  # both inside the masks


def test_box_and_prompt_errors_name_the_image(tmp_path):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((50, 60, 3), np.uint8)).save(img)
    with pytest.raises(DataError, match=r"x\.png: box \[0.0, 0.0, 61.0, 40.0\] from box= is outside the image "
                                        r"\(60x50 pixels\)"):
        plan_jobs(img, box=[0, 0, 61, 40])
    with pytest.raises(DataError, match=r"x\.png: box \[10.0, 5.0, 10.0, 40.0\] from box= has zero area"):
        plan_jobs(img, box=[10, 5, 10, 40])
    with pytest.raises(DataError, match=r"x\.png: box .* is outside the image"):
        plan_jobs(img, box=[[1, 1, 5, 5], [-1, 0, 5, 5]])
    assert plan_jobs(img, box=[[1, 1, 5, 5], [0, 0, 60, 50]]).jobs[0].boxes.shape == (2, 4)
    with pytest.raises(ConfigError, match="box= is for a single image"):
        plan_jobs(tmp_path, box=[1, 1, 5, 5])
    with pytest.raises(ConfigError, match="not both"):
        plan_jobs(img, prompts=tmp_path, box=[1, 1, 5, 5])
    with pytest.raises(ConfigError, match="SAM needs a prompt"):
        plan_jobs(img)
    (tmp_path / "b.json").write_text(json.dumps({"x": [[0, 0, 70, 10]]}))
    with pytest.raises(DataError, match=r"x\.png: box .* from b\.json is outside"):
        plan_jobs(tmp_path, tmp_path / "b.json")
    (tmp_path / "dup.json").write_text(json.dumps({"x": [[0, 0, 5, 5]], "x.png": [[0, 0, 6, 6]]}))
    with pytest.raises(DataError, match=r"entries 'x' and 'x.png' name the same image"):
        plan_jobs(tmp_path, tmp_path / "dup.json")
    (tmp_path / "bad.csv").write_text("image,x0,y0,x1,y1\nx.png,1,2,three,4\n")
    with pytest.raises(DataError, match=r"bad\.csv: line 2: box .* is not four numbers"):
        load_boxes_csv(tmp_path / "bad.csv")
    (tmp_path / "hdr.csv").write_text("file,a,b,c,d\nx.png,1,2,3,4\n")
    with pytest.raises(DataError, match=r"hdr\.csv: needs a header with the columns image,x0,y0,x1,y1"):
        load_boxes_csv(tmp_path / "hdr.csv")
    (tmp_path / "prompts.txt").write_text("")
    with pytest.raises(DataError, match="unknown prompts format"):
        plan_jobs(img, tmp_path / "prompts.txt")


def test_lite_zero_shot_on_real_kvasir_with_masks(real_root, tmp_path):
    """The pretrained LiteMedSAM, no checkpoint, ground-truth masks as prompts (2 images: ~3 s each on CPU)."""
    d = real_root / "TestDataset" / "Kvasir"
    summary = predict(_predict_cfg("model=lite", f"input={d / 'images'}", f"prompts={d / 'masks'}", "limit=2",
                                   f"output={tmp_path / 'out'}", "batch_size=2"))
    assert summary["predicted"] == 2 and summary["zero_shot"] is True and summary["unused_prompts"] == []
    dices = []
    for img, m in _pairs(real_root, 2):
        pred = np.asarray(Image.open(tmp_path / "out" / "masks" / f"{img.stem}.png")) > 0
        dices.append(dice_iou(pred, read_mask(m))[0])
    print(f"lite zero-shot via predict: Dice {dices}, {summary['seconds_per_image']} s/image")
    assert min(dices) > 0.9  # 0.957 and 0.983 when the preprocessing is right
