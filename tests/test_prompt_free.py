"""Prompt-free segmentation: prompt=none, mixed-prompt training and the two-stage prompt=auto."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from polypsam.config import CONF_DIR, prompt_from_cfg
from polypsam.data.io import read_mask
from polypsam.errors import ConfigError
from polypsam.evaluation import EvalSettings, evaluate_model
from polypsam.evaluation.tasks import untrained_prompt_warning
from polypsam.inference import AutoPredictor, Predictor
from polypsam.inference.items import ImageItems
from polypsam.metrics import dice_iou
from polypsam.models import build_model
from polypsam.prediction import plan_jobs, run_prediction
from polypsam.prompts import PromptSet, build_prompt, collate_prompts
from polypsam.prompts.auto import AutoPrompt
from polypsam.prompts.box import BoxPrompt
from polypsam.prompts.none import NonePrompt
from test_baselines import TINY
from test_evaluate import make_root
from test_prompts import ellipse


def _tiny():
    torch.manual_seed(0)
    return build_model("tiny", pretrained=False).eval()


# ------------------------------------------------------------------------------------------ prompt types


def test_none_asks_every_frame_once_even_without_a_polyp():
    rng = np.random.default_rng(0)
    for mask in (ellipse(40, 50, 20, 25, 8, 10), np.zeros((40, 50), bool)):
        p = NonePrompt().make(mask, rng)
        assert p.empty and len(p) == 1 and p.kind == "empty"
    with pytest.raises(ValueError, match="neither boxes nor points"):
        PromptSet(boxes=np.zeros((1, 4), np.float32), empty=True)


def test_mixed_draws_each_type_at_its_rate_and_validates_with_one():
    m = build_prompt({"type": "mixed", "options": {"none": {"p": 0.25}, "box": {"p": 0.75, "jitter_frac": 0.1}}})
    mask = ellipse(60, 60, 30, 30, 10, 12)
    rng = np.random.default_rng(1)
    kinds = [m.make(mask, rng).kind for _ in range(800)]
    assert 0.20 < kinds.count("empty") / 800 < 0.30 and set(kinds) == {"empty", "box"}
    assert m.without_noise() == NonePrompt() and m.make(mask, rng, noisy=False).empty
    assert m.prompt_free and not BoxPrompt().prompt_free
    assert build_prompt({"type": "mixed", "validate": "box"}).without_noise() == BoxPrompt()


@pytest.mark.parametrize("cfg,match", [
    ({"options": {"none": {"p": 0.5}, "box": {"p": 0.6}}}, "sum to 1"),
    ({"validate": "point"}, r"prompt.validate='point': choose one of the options \(none, box\)"),
    ({"options": {"auto": {"p": 1.0}}, "validate": "auto"}, "cannot be drawn per sample"),
    ({"options": {"box": {"p": 1.0, "jiter": 1}}, "validate": "box"}, "unknown setting.*jiter"),
])
def test_mixed_settings_errors(cfg, match):
    with pytest.raises(ConfigError, match=match):
        build_prompt({"type": "mixed", **cfg})


def test_mixed_composes_from_the_command_line():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["prompt=mixed", "~prompt.options",
                                          "+prompt.options={point: {p: 0.3}, box: {p: 0.7}}", "prompt.validate=box"])
    m = prompt_from_cfg(cfg)
    assert [(p.name, w) for p, w in m.choices] == [("point", 0.3), ("box", 0.7)]
    assert m.without_noise() == BoxPrompt() and not m.prompt_free


def test_a_box_trained_checkpoint_is_flagged_for_prompt_free_use():
    box_run = {"config": {"prompt": {"type": "box", "jitter_frac": 0.1}}}
    assert "trained with prompt=box (box jitter 0.1) only" in untrained_prompt_warning(NonePrompt(), box_run)
    assert "zero-shot" in untrained_prompt_warning(AutoPrompt(), None)
    assert untrained_prompt_warning(AutoPrompt(), {"config": {"prompt": {"type": "mixed"}}}) is None
    assert untrained_prompt_warning(BoxPrompt(), box_run) is None
    old = {"config": {}}  # checkpoints from before the prompt group trained with boxes
    assert "prompt=box" in untrained_prompt_warning(NonePrompt(), old)


def test_auto_cannot_train():
    with pytest.raises(ConfigError, match="cannot train: train with prompt=mixed"):
        AutoPrompt().unused_parameters
    with pytest.raises(ConfigError, match="cannot train"):
        AutoPrompt().make(np.ones((4, 4), bool), np.random.default_rng(0))


def test_auto_proposals_skip_highlights_and_doubt_and_pad_inside_the_frame():
    prob = np.zeros((200, 300), np.float32)
    prob[50:100, 100:180] = 0.9      # a polyp: 50 x 80 px
    prob[160:200, 250:300] = 0.7     # a second one in the bottom-right corner
    prob[10:14, 10:14] = 0.99        # a specular highlight: 16 px, under min_area
    prob[120:140, 20:60] = 0.55      # an unsure blob: above threshold, mean under min_score
    auto = AutoPrompt(threshold=0.5, min_score=0.6, min_area=0.002, margin=0.1, margin_px=2)
    p = auto.propose(prob)
    assert p.scores.tolist() == pytest.approx([0.9, 0.7])
    np.testing.assert_allclose(p.boxes[0], [100 - 10, 50 - 7, 179 + 10, 99 + 7])
    assert p.boxes[1][2] == 299 and p.boxes[1][3] == 199  # clipped to the frame
    assert len(AutoPrompt(max_boxes=1).propose(prob)) == 1
    assert len(auto.propose(np.zeros((50, 50), np.float32))) == 0


# ------------------------------------------------------------------------------------- batches and decode


def test_collate_marks_prompt_free_rows_per_prompt():
    b = collate_prompts([PromptSet(boxes=np.ones((2, 4), np.float32)), PromptSet(empty=True), PromptSet(),
                         PromptSet(boxes=np.full((1, 4), 3, np.float32))])
    assert b.image_index.tolist() == [0, 0, 1, 3]
    assert b.prompt_free.tolist() == [False, False, True, False]
    assert b.boxes[2].abs().sum() == 0 and b.boxes[3, 0] == 3
    only = collate_prompts([PromptSet(empty=True), PromptSet(empty=True)])
    assert only.boxes is None and only.points is None and only.prompt_free.tolist() == [True, True]


def test_empty_prompt_decodes_as_stock_sam_and_a_mixed_batch_as_its_parts():
    net = _tiny()
    net.mask_decoder.double()  # the prompt encoder stays float32, as SAM's casts its inputs (see test_models)
    emb = torch.randn(2, net.spec.embedding_dim, net.spec.embedding_size, net.spec.embedding_size,
                      dtype=torch.float64)
    idx = torch.arange(2)
    mine, _ = net.decode(emb, None, idx)
    sparse, dense = (t.double() for t in net.prompt_encoder(points=None, boxes=None, masks=None))
    for j in range(2):  # segment_anything's own MaskDecoder with the empty prompt, one image at a time
        stock, _ = net.mask_decoder(image_embeddings=emb[j:j + 1], image_pe=net.prompt_encoder.get_dense_pe().double(),
                                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                    multimask_output=False)
        torch.testing.assert_close(mine[j:j + 1], stock)
    boxes = torch.tensor([[0, 0, 0, 0], [5, 6, 40, 50], [10, 10, 30, 20]], dtype=torch.float32)
    index, free = torch.tensor([0, 1, 1]), torch.tensor([True, False, False])
    mixed, iou = net.decode(emb, boxes, index, prompt_free=free)
    boxed, iou_b = net.decode(emb, boxes[1:], index[1:])
    torch.testing.assert_close(mixed[:1], mine[:1])
    torch.testing.assert_close(mixed[1:], boxed)
    torch.testing.assert_close(iou[1:], iou_b)


# ------------------------------------------------------------------------------- evaluation and prediction


@pytest.fixture(scope="module")
def auto_eval(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auto")
    root = make_root(tmp / "root")
    auto = AutoPrompt(threshold=0.5, min_score=0.0, min_area=0.0, max_boxes=2)
    settings = EvalSettings(prompt=auto, noise=(0.0, 0.1), device="cpu", figures=True)
    identity = {"untrained_prompt": untrained_prompt_warning(auto, None)}  # as the evaluate CLI passes it
    return root, evaluate_model(_tiny(), root, tmp / "ev", settings, identity=identity, verbose=False)


def test_auto_reports_its_stages_and_detection_counts(auto_eval):
    root, res = auto_eval
    out = res.out_dir
    per = pd.read_csv(out / "per_image.csv")
    none, box = pd.read_csv(out / "per_image_none.csv"), pd.read_csv(out / "per_image_box.csv")
    assert per["image"].tolist() == none["image"].tolist() == box["image"].tolist()  # unreadable kept in all
    ok = per[per["status"] == "ok"]
    assert (ok["n_prompts"] <= 2).all() and (none.loc[ok.index, "n_prompts"] == 1).all()
    det = pd.read_csv(out / "detection.csv").set_index("dataset")
    for name, sub in ok.groupby("dataset"):
        truth = [read_mask(p).any() for p in sub["mask_path"]]
        pos = np.array(truth)
        assert det.loc[name, "with_polyp"] == pos.sum()
        assert det.loc[name, "missed"] == int((pos & (sub["n_prompts"] == 0).to_numpy()).sum())
        assert det.loc[name, "correct_rejections"] + det.loc[name, "false_alarms"] == (~pos).sum()
        assert det.loc[name, "proposals"] == sub["n_prompts"].sum()
    empty = ok[ok["image"] == "c1_empty"].iloc[0]  # a frame with no polyp: Dice 1 exactly when nothing is proposed
    assert (empty["dice"] == 1.0) == (empty["n_prompts"] == 0)
    # the oracle companion is the box-prompted evaluation of the same network
    boxed = evaluate_model(_tiny(), root, out.parent / "box", EvalSettings(prompt=BoxPrompt(), noise=(),
                           device="cpu", figures=False), verbose=False)
    np.testing.assert_allclose(box["dice"], boxed.per_image["dice"])
    rob = pd.read_csv(out / "robustness.csv")
    np.testing.assert_allclose(rob[rob["noise"] == 0]["dice"], res.companion_summaries["box"]["dice"])
    md = (out / "summary.md").read_text()
    assert "zero-shot SAM was pretrained with prompts only" in md  # the random tiny net never saw no prompt
    assert "Table 2 layout, prompt-free" in md and "ASPS (quoted" in md and "Table 2 layout, oracle box" in md
    assert md.index("HSNet (quoted") < md.index("Table 2 layout, oracle box") < md.index("Polyp-SAM-B (quoted")
    assert "## Detection" in md and (out / "robustness.png").is_file()


def test_a_frame_with_nothing_kept_stays_a_recorded_miss(tmp_path):
    """keep=clear and a final score no proposal reaches: every frame is still a row, scored with an empty mask."""
    root = make_root(tmp_path / "root")
    strict = AutoPrompt(threshold=0.5, min_score=0.0, min_area=0.0, score="agreement", keep="clear", final_score=1.0)
    res = evaluate_model(_tiny(), root, tmp_path / "ev", EvalSettings(prompt=strict, noise=(), device="cpu",
                         figures=False, save_masks=False), verbose=False)
    ok = res.per_image[res.per_image["status"] == "ok"]
    assert len(res.per_image) == 8 and (ok["n_prompts"] == 0).all()
    det = res.detection.set_index("dataset")
    assert (det["missed"] == det["with_polyp"]).all() and det["correct_rejections"].sum() == 1
    assert ok[ok["image"] == "c1_empty"]["dice"].tolist() == [1.0] and (ok[ok["image"] != "c1_empty"]["dice"] == 0).all()


def test_auto_refines_exactly_the_boxes_it_records(auto_eval):
    """Decoding the recorded proposals with the box prompt gives the auto mask: stage 2 is the box path."""
    root, res = auto_eval
    row = res.per_image[(res.per_image["status"] == "ok") & (res.per_image["n_prompts"] > 0)].iloc[0]
    img = np.asarray(Image.open(row["image_path"]).convert("RGB"))
    boxes = np.array([[float(v) for v in b.split(",")] for b in row["box"].split(";")], np.float32)
    pred = Predictor(_tiny(), "cpu")([img], [PromptSet(boxes=boxes)])[0]
    saved = np.asarray(Image.open(res.out_dir / row["pred_mask"])) > 0
    assert dice_iou(pred.prob > 0.5, saved)[0] > 0.999


def test_auto_proposer_must_share_the_refiner_input_size():
    other = Predictor(_tiny(), "cpu")
    with pytest.raises(ConfigError, match=r"prompt.proposer=p.ckpt: its model 'lite' takes 256 px inputs, the "
                                          r"refiner 'tiny' 64 px; use a proposer trained at model.image_size=64"):
        AutoPredictor(other, AutoPrompt(proposer="p.ckpt"), build_model("lite", pretrained=False))
    retrained = _tiny()  # the same model with other encoder weights: stage 1 encodes on its own
    with torch.no_grad():
        next(retrained.image_encoder.parameters()).add_(0.1)
    assert AutoPredictor(other, AutoPrompt(proposer="p.ckpt"), retrained).shared_encoder is False
    assert AutoPredictor(other, AutoPrompt(proposer="p.ckpt"), _tiny()).shared_encoder is True


def _unet(resize_method: str):
    torch.manual_seed(1)
    net = build_model("unet", **TINY).eval()
    net.spec = dataclasses.replace(net.spec, resize_method=resize_method)  # LiteMedSAM's resize against SAM's
    return net


def test_a_unet_proposes_for_sam_from_its_own_canvas(tmp_path):
    """A prompt-free baseline as stage 1: it reads the canvas it was trained on (here another resize than the
    refiner's), so stage 1 is exactly the U-Net's own prediction, and evaluate's none companion is the
    U-Net's own evaluation; the refiner decodes the boxes on its own canvas."""
    root = make_root(tmp_path / "root")
    unet, refiner = _unet("cv2_area"), Predictor(_tiny(), "cpu")
    auto = AutoPredictor(refiner, AutoPrompt(proposer="unet.ckpt", min_score=0.0, min_area=0.0), unet)
    assert auto.proposer_spec == unet.spec and not auto.shared_encoder
    images = sorted((root / "TestDataset" / "Kvasir" / "images").iterdir())
    items = [ImageItems(images, refiner.spec, proposer_spec=auto.proposer_spec)[i] for i in range(len(images))]
    resizes = [it["resize"] for it in items]
    canvases = torch.stack([it["canvas"] for it in items])
    with pytest.raises(ValueError, match="the proposer reads its own canvas"):
        auto.predict(canvases, resizes)
    two = auto.predict(canvases, resizes, auto.stage1_canvases(items))
    rgb = [np.asarray(Image.open(p).convert("RGB")) for p in images]
    own = Predictor(unet, "cpu")(rgb, [PromptSet(empty=True) for _ in rgb])
    for got, want in zip(two.proposal, own):
        np.testing.assert_array_equal(got.prob, want.prob)
    wrong = Predictor(unet, "cpu").predict(canvases, resizes, [PromptSet(empty=True) for _ in rgb])
    assert max(np.abs(g.prob - w.prob).max() for g, w in zip(two.proposal, wrong)) > 1e-3  # the canvas matters
    boxed = refiner.predict(canvases, resizes, [r.prompts for r in two.refined])
    for got, want in zip(two.refined, boxed):
        np.testing.assert_array_equal(got.prob, want.prob)
    # without a blend under 1 the refiner's own map is not decoded; asking for one then is an error
    alone = auto.stage1(refiner.encode(canvases, resizes), resizes, auto.stage1_canvases(items))
    assert alone.own is None
    with pytest.raises(ValueError, match="blend=0.5 asked of a batch built without the refiner's own maps"):
        alone.stage1_prob(0, 0.5)
    # blend: stage 1 averages the U-Net with the refiner's own prompt-free map, and the boxes come from that
    half = AutoPredictor(refiner, dataclasses.replace(auto.prompt, blend=0.5), unet)
    mixed = half.predict(canvases, resizes, half.stage1_canvases(items))
    sam = refiner.predict(canvases, resizes, [PromptSet(empty=True) for _ in rgb])
    for got, u, m in zip(mixed.proposal, own, sam):
        np.testing.assert_allclose(got.prob, 0.5 * u.prob + 0.5 * m.prob, rtol=0, atol=1e-6)
    # blend 0, the third stage-1 source select_auto chooses among: the refiner's own map, the proposer unused
    mine = AutoPredictor(refiner, dataclasses.replace(auto.prompt, blend=0.0), unet)
    for got, m in zip(mine.predict(canvases, resizes, mine.stage1_canvases(items)).proposal, sam):
        np.testing.assert_allclose(got.prob, m.prob, rtol=0, atol=1e-6)
    first = mixed.refined[0].prompts.boxes
    want = half.prompt.proposals(half.prompt.components(mixed.proposal[0].prob)).boxes
    np.testing.assert_array_equal(first, want[:len(first)])
    # predict: a folder of frames, each resized for both networks in the loader; its masks are these
    plan = plan_jobs(images[0].parent, prompt=half.prompt)
    run_prediction(_tiny(), plan, tmp_path / "pred", device="cpu", progress=False, overlays=False,
                   prompt=half.prompt, proposer=unet)
    for path, want in zip(images, mixed.refined):
        saved = np.asarray(Image.open(tmp_path / "pred" / "masks" / f"{path.stem}.png")) > 0
        np.testing.assert_array_equal(saved, want.prob > 0.5)
    # end to end: evaluate's stage-1 companion is the U-Net's own prompt-free evaluation, with no warning
    prompt = AutoPrompt(proposer="unet.ckpt", min_score=0.0, min_area=0.0)
    assert untrained_prompt_warning(prompt, {"config": {"prompt": {"type": "box"}}}, unet) is None
    res = evaluate_model(_tiny(), root, tmp_path / "auto", EvalSettings(prompt=prompt, noise=(), device="cpu",
                         figures=False), verbose=False, proposer=unet)
    alone = evaluate_model(unet, root, tmp_path / "unet", EvalSettings(prompt=NonePrompt(), noise=(), device="cpu",
                           figures=False), verbose=False)
    none = pd.read_csv(res.out_dir / "per_image_none.csv")
    assert none["image"].tolist() == alone.per_image["image"].tolist()
    np.testing.assert_allclose(none["dice"], alone.per_image["dice"])


def test_predict_a_folder_of_frames_with_no_prompt_file(tmp_path):
    frames = tmp_path / "video"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in (2, 0, 1):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(frames / f"frame_{i:03d}.png")
    auto = AutoPrompt(threshold=0.5, min_score=0.0, min_area=0.0)
    plan = plan_jobs(frames, prompt=auto)
    assert [j.image.name for j in plan.jobs] == ["frame_000.png", "frame_001.png", "frame_002.png"]
    with pytest.raises(ConfigError, match="prompt=auto needs no prompts"):
        plan_jobs(frames, prompts=frames, prompt=auto)
    out = tmp_path / "out"
    summary = run_prediction(_tiny(), plan, out, device="cpu", progress=False, prompt=auto)
    assert summary["predicted"] == 3
    for j in plan.jobs:
        rec = json.loads((out / "json" / f"{j.stem}.json").read_text())
        assert rec["proposals"] == len(rec["boxes"]) == len(rec["scores"])
        assert Path(out / rec["mask"]).is_file() and Path(out / rec["overlay"]).is_file()
