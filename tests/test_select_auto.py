"""prompt=auto's scoring and keeping, its settings file, and the selection command on validation."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from polypsam.config import CONF_DIR
from polypsam.download import sha256_file
from polypsam.errors import ConfigError
from polypsam.evaluation.select_auto import Grid, select_auto
from polypsam.inference import Predictor
from polypsam.inference.auto import AutoBatch
from polypsam.inference.predictor import preprocess
from polypsam.metrics import dice_iou
from polypsam.models import build_model
from polypsam.prompts import PromptSet, auto_settings, build_prompt
from polypsam.prompts.auto import AutoPrompt
from polypsam.prompts.auto_settings import command_line_keys, resolve
from test_evaluate import run_cli
from test_train import run_train


def _maps():
    """Synthetic stage-1 maps: one clear winner beside a doubtful blob, two equal polyps, nothing."""
    clear = np.zeros((120, 160), np.float32)
    clear[20:70, 30:90] = 0.95
    clear[90:110, 120:150] = 0.65
    equal = np.zeros((120, 160), np.float32)
    equal[10:50, 10:60] = 0.9
    equal[60:100, 90:140] = 0.9
    return clear, equal, np.zeros((120, 160), np.float32)


def _kept(prompt: AutoPrompt, prob: np.ndarray) -> int:
    p = prompt.proposals(prompt.components(prob))
    return len(prompt.kept(p.mean_prob))


def test_keep_clear_keeps_a_clear_winner_alone_and_equal_polyps_both():
    clear, equal, nothing = _maps()
    every, alone = AutoPrompt(), AutoPrompt(keep="clear", clear_margin=0.2)
    assert [_kept(every, m) for m in (clear, equal, nothing)] == [2, 2, 0]
    assert [_kept(alone, m) for m in (clear, equal, nothing)] == [1, 2, 0]
    assert _kept(AutoPrompt(keep="clear", clear_margin=0.4), clear) == 2  # a lead of 0.3 is not clear at 0.4
    assert _kept(AutoPrompt(final_score=0.8), clear) == 1 and _kept(AutoPrompt(final_score=0.96), clear) == 0
    p = alone.proposals(alone.components(clear))
    kept = alone.kept(p.mean_prob)
    np.testing.assert_allclose(p.boxes[kept][0], [30 - 10, 20 - 9, 89 + 10, 69 + 9])  # margin 0.1, 4 px
    # the old entry point gives the same boxes, scored by mean probability
    np.testing.assert_allclose(every.propose(clear).boxes, p.boxes)
    scores = np.array([0.2, 0.9, 0.5], np.float32)
    assert AutoPrompt(keep="clear").kept(scores).tolist() == [1]  # best first whatever the input order
    assert AutoPrompt(max_boxes=2).kept(scores).tolist() == [1, 2]
    with pytest.raises(ConfigError, match="score='iou'.*choose score from mean_prob, agreement"):
        AutoPrompt(score="iou")


class CountingPredictor(Predictor):
    """Counts the box prompts stage 2 decodes."""

    boxes_decoded = 0

    def decode(self, embeddings, resizes, prompts):
        self.boxes_decoded += sum(len(p) for p in prompts)
        return super().decode(embeddings, resizes, prompts)


def test_stage2_scores_decode_each_box_once_and_a_frame_with_nothing_kept_is_a_miss():
    torch.manual_seed(0)
    refiner = CountingPredictor(build_model("tiny", pretrained=False).eval(), "cpu")
    maps = _maps()
    images = [np.zeros((*m.shape, 3), np.uint8) for m in maps]
    pre = [preprocess(im, refiner.spec) for im in images]
    resizes = [rz for _, rz in pre]
    emb = refiner.encode(torch.stack([c for c, _ in pre]), resizes)
    stage1 = [refiner.decode(emb[:1], resizes[:1], [PromptSet(empty=True)])[0] for _ in maps]
    for s, m in zip(stage1, maps):
        s.prob = m  # the synthetic stage-1 maps stand in for the network's
    batch = AutoBatch(refiner, emb, resizes, stage1)
    today = batch.refine(AutoPrompt())
    direct = Predictor(refiner.net, "cpu").decode(emb, resizes, [AutoPrompt().propose(m) for m in maps])
    for a, b in zip(today, direct):  # the default settings refine exactly as before: all boxes, merged
        np.testing.assert_array_equal(a.prob, b.prob)
        np.testing.assert_array_equal(a.prompts.boxes, b.prompts.boxes)
    agree = AutoPrompt(score="agreement")
    first = batch.refine(agree)
    comps = agree.components(maps[0])
    props = agree.proposals(comps)
    alone = refiner.decode(emb[:1].expand(2, -1, -1, -1), resizes[:1] * 2, [PromptSet(boxes=b[None]) for b in props.boxes])
    expected = [dice_iou(a.prob > 0.5, comps.labels == i)[1] for a, i in zip(alone, props.ids)]
    assert sorted(first[0].prompts.scores.tolist()) == pytest.approx(sorted(expected)) and max(expected) > 0
    decoded = refiner.boxes_decoded
    for p in (agree, AutoPrompt(score="prob_x_agreement"), AutoPrompt(score="iou_head", keep="clear")):
        batch.refine(p)
    assert refiner.boxes_decoded == decoded  # every box set of these settings was decoded before
    none = batch.refine(AutoPrompt(score="agreement", keep="clear", final_score=1.0))
    for pred, m in zip(none, maps):  # nothing survives: a recorded miss, an empty mask of the frame's size
        assert len(pred.prompts) == 0 and pred.prob.shape == m.shape and not pred.prob.any()

def _synthetic_stage1():
    """The tiny refiner, its embeddings of blank frames, and stage-1 predictions whose maps are ``_maps()``."""
    torch.manual_seed(0)
    refiner = Predictor(build_model("tiny", pretrained=False).eval(), "cpu")
    maps = _maps()
    pre = [preprocess(np.zeros((*m.shape, 3), np.uint8), refiner.spec) for m in maps]
    resizes = [rz for _, rz in pre]
    emb = refiner.encode(torch.stack([c for c, _ in pre]), resizes)
    stage1 = [refiner.decode(emb[:1], resizes[:1], [PromptSet(empty=True)])[0] for _ in maps]
    for s, m in zip(stage1, maps):
        s.prob = m  # the synthetic stage-1 maps stand in for the network's
    return refiner, emb, resizes, stage1


def test_a_batch_shared_by_many_settings_refines_each_as_a_fresh_one():
    """AutoBatch keeps what settings share (components, proposals, decoded boxes, tight boxes); each setting of
    a grid, refined in turn on one batch, equals its refinement on a batch of its own. Checked: with margin
    left out of the proposals' key, the second margin reuses the first one's boxes and this fails."""
    refiner, emb, resizes, stage1 = _synthetic_stage1()
    grid = Grid(threshold=(0.3, 0.5), min_score=(0.5,), min_area=(0.001, 0.02), margin=(0.05, 0.2),
                score=("mean_prob", "agreement"), keep=("all", "clear"), clear_margin=(0.1,), final_score=(0.0, 0.5),
                rebox=(0, 1, 2), blend=(1.0,))
    shared = AutoBatch(refiner, emb, resizes, stage1)
    for prompt in grid.points(AutoPrompt()):
        for a, b in zip(shared.refine(prompt), AutoBatch(refiner, emb, resizes, stage1).refine(prompt)):
            # the decoder batches other boxes beside these on the shared batch: float rounding, 1e-7
            np.testing.assert_allclose(a.prob, b.prob, atol=1e-6, err_msg=str(prompt))
            np.testing.assert_array_equal(a.prompts.boxes, b.prompts.boxes, err_msg=str(prompt))
            np.testing.assert_allclose(a.prompts.scores, b.prompts.scores, atol=1e-6, err_msg=str(prompt))


def test_rebox_replaces_each_kept_box_by_the_tight_box_of_its_own_mask():
    refiner, emb, resizes, stage1 = _synthetic_stage1()
    batch = AutoBatch(refiner, emb, resizes, stage1)
    before, after = batch.refine(AutoPrompt()), batch.refine(AutoPrompt(rebox=1))
    moved = 0
    for j, (b, a) in enumerate(zip(before, after)):
        assert len(a.prompts) == len(b.prompts)  # the same proposals, their scores kept
        np.testing.assert_array_equal(a.prompts.scores, b.prompts.scores)
        for box, new in zip(b.prompts.boxes, a.prompts.boxes):
            own = refiner.decode(emb[j:j + 1], resizes[j:j + 1], [PromptSet(boxes=box[None])])[0].prob > 0.5
            ys, xs = np.nonzero(own)
            expected = box if ys.size == 0 else [xs.min(), ys.min(), xs.max(), ys.max()]
            np.testing.assert_array_equal(new, expected)
            moved += not np.array_equal(new, box)
        merged = refiner.decode(emb[j:j + 1], resizes[j:j + 1], [PromptSet(boxes=a.prompts.boxes)])[0]
        # the final mask is decoded from the new boxes (to float rounding: the batch decodes other boxes beside them)
        np.testing.assert_allclose(a.prob, merged.prob, atol=1e-6)
    assert moved > 0
    assert not any(len(p.prompts) for p in batch.refine(AutoPrompt(rebox=2))[2:])  # a miss stays a miss
    with pytest.raises(ConfigError, match="rebox=4 must be a whole number"):
        AutoPrompt(rebox=4)


def _compose(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("select_auto", overrides=list(overrides))


def test_grid_starts_with_the_default_and_tries_clear_with_each_margin(tmp_path):
    cfg = _compose("ckpt_path=x", "grid.threshold=[0.5]", "grid.min_score=[0.6]", "grid.min_area=[0.002]",
                   "grid.margin=[0.1]", "grid.final_score=[0.0, 0.5]", "grid.rebox=[0, 1]")
    default = build_prompt({**cfg.prompt, "settings": None})
    points = Grid.from_cfg(cfg.grid).points(default)
    assert points[0] == default and len(set(points)) == len(points)
    # score x (all, clear 0.1, clear 0.3) x final_score x rebox, the default among them
    assert len(points) == 4 * (1 + 2) * 2 * 2
    # blend, the stage-1 source, is swept only with a separate proposer (without one it changes nothing):
    # the refiner's own map (0), their mean (0.5) and the proposer alone (1) are chosen on validation
    two_stage = dataclasses.replace(default, proposer="unet.ckpt")
    assert len(Grid.from_cfg(cfg.grid).points(two_stage)) == 3 * len(points)
    assert {p.blend for p in Grid.from_cfg(cfg.grid).points(two_stage)} == {0.0, 0.5, 1.0}
    with pytest.raises(ConfigError, match="grid.score needs at least one value"):
        Grid.from_cfg({**cfg.grid, "score": []})
    with pytest.raises(ConfigError, match="ckpt_path= is required"):
        select_auto(_compose())
    with pytest.raises(ConfigError, match=rf"out={tmp_path}/a.json lies in the data root {tmp_path}"):
        select_auto(_compose("ckpt_path=x", f"data.root={tmp_path}", f"out={tmp_path / 'a.json'}"))


def _settings_file(tmp_path, ckpt, spec, **chosen):
    doc = {"identity": auto_settings.identity(ckpt, spec), "chosen": {**auto_settings.tuned(AutoPrompt()), **chosen},
           "validation_dice": {"chosen": 0.8, "default": 0.7}}
    return auto_settings.write(auto_settings.beside(ckpt), doc)


def test_settings_file_applies_below_the_command_line_and_refuses_another_checkpoint(tmp_path):
    spec = build_model("tiny", pretrained=False).spec
    ckpt, other = tmp_path / "best.ckpt", tmp_path / "other.ckpt"
    ckpt.write_bytes(b"one checkpoint")
    other.write_bytes(b"another checkpoint")
    path = _settings_file(tmp_path, ckpt, spec, threshold=0.3, keep="clear", score="agreement")
    assert path == tmp_path / "best.auto.json"
    applied, record = resolve(AutoPrompt(threshold=0.45), ckpt, spec, explicit={"threshold"})
    assert (applied.threshold, applied.keep, applied.score, applied.settings) == (0.45, "clear", "agreement", str(path))
    assert record["command_line"] == ["threshold"] and record["file"] == str(path)
    assert resolve(AutoPrompt(), ckpt, spec, explicit=set())[0].threshold == 0.3
    ignored, none = resolve(AutoPrompt(settings=None), ckpt, spec, explicit=set())
    assert none is None and ignored == AutoPrompt(settings=None)
    assert resolve(AutoPrompt(), other, spec, explicit=set())[1] is None  # no file beside the other one
    with pytest.raises(ConfigError, match=rf"prompt.settings={path}: written for checkpoint {ckpt} \(sha256 "
                       rf"{sha256_file(ckpt)[:12]}.*but this run uses checkpoint {other} .*prompt.settings=null"):
        resolve(AutoPrompt(settings=str(path)), other, spec, explicit=set())
    lite = build_model("lite", pretrained=False).spec
    with pytest.raises(ConfigError, match=r"model tiny, .*but this run uses .*model lite"):
        resolve(AutoPrompt(), ckpt, lite, explicit=set())
    assert command_line_keys(["prompt=auto", "prompt.threshold=0.4", "+prompt.keep=clear", "data.root=/d"]) \
        == {"threshold", "keep"}


def test_each_proposer_has_its_own_settings_file_beside_the_checkpoint(tmp_path):
    """The settings chosen with a U-Net as stage 1 and those chosen with the network itself live side by side;
    each evaluation finds its own, and a file written for one proposer is refused for another."""
    spec = build_model("tiny", pretrained=False).spec
    ckpt, unet, other = tmp_path / "best.ckpt", tmp_path / "unet.ckpt", tmp_path / "other.ckpt"
    for f in (ckpt, unet, other):
        f.write_bytes(f.name.encode())
    own = _settings_file(tmp_path, ckpt, spec, threshold=0.3)
    doc = {"identity": auto_settings.identity(ckpt, spec, unet), "chosen": {**auto_settings.tuned(AutoPrompt()),
           "threshold": 0.7}}
    theirs = auto_settings.write(auto_settings.beside(ckpt, unet), doc)
    assert theirs.name == f"best.auto-proposer-{sha256_file(unet)[:12]}.json" and theirs != own
    assert resolve(AutoPrompt(), ckpt, spec, explicit=set())[0].threshold == 0.3
    assert resolve(AutoPrompt(proposer=str(unet)), ckpt, spec, explicit=set())[0].threshold == 0.7
    assert resolve(AutoPrompt(proposer=str(other)), ckpt, spec, explicit=set())[1] is None  # none chosen for it
    with pytest.raises(ConfigError, match=rf"written for .*proposer sha256 {sha256_file(unet)[:12]}\), but this "
                                          rf"run uses .*proposer sha256 {sha256_file(other)[:12]}\)"):
        resolve(AutoPrompt(proposer=str(other), settings=str(theirs)), ckpt, spec, explicit=set())


@pytest.mark.slow  # three subprocesses: train, select, evaluate
def test_select_auto_end_to_end_then_evaluate_reads_the_choice(small_root, tmp_path):
    run = tmp_path / "run"
    run_train("+experiment=tiny", "data=pranet", "prompt=mixed", f"data.root={small_root}", "data.num_workers=0",
              "data.limit_train=null", "data.limit_val=null", "data.limit_test=2", f"paths.root_dir={tmp_path}",
              f"data.embedding_cache.dir={tmp_path / 'cache'}", f"hydra.run.dir={run}")
    ckpt = run / "checkpoints" / "best.ckpt"
    common = [f"data.root={small_root}", "data.num_workers=0", f"paths.root_dir={tmp_path}",
              f"data.embedding_cache.dir={tmp_path / 'cache'}"]
    run_cli("polypsam.select_auto", f"ckpt_path={ckpt}", *common, f"hydra.run.dir={tmp_path / 'sel'}",
            "grid.threshold=[0.3,0.5]", "grid.min_score=[0.0,0.6]", "grid.min_area=[0.0,0.002]",
            "grid.margin=[0.1]", tmp=tmp_path)
    doc = json.loads((run / "checkpoints" / "best.auto.json").read_text())
    assert doc["grid"]["size"] == 2 * 2 * 2 * 1 * 4 * 3 * 3 * 2  # ... x final_score x rebox; the default among them
    assert doc["validation_dice"]["chosen"] >= doc["validation_dice"]["default"]
    assert doc["top"][0]["dice"] == doc["validation_dice"]["chosen"]
    assert doc["identity"]["checkpoint_sha256"] == sha256_file(ckpt) and doc["identity"]["model"] == "tiny"
    assert doc["split"]["file"] == str(run / "split.json") and doc["split"]["val_images"] == 3
    assert doc["detection"]["chosen"]["frames"] == 3 and not list(small_root.rglob("*.auto.json"))
    ev = tmp_path / "ev"
    run_cli("polypsam.evaluate", f"ckpt_path={ckpt}", "prompt=auto", "prompt.margin=0.15", *common,
            "figures=false", "data.limit_test=2", f"hydra.run.dir={ev}", tmp=tmp_path)
    meta = json.loads((ev / "meta.json").read_text())
    chosen = {**doc["chosen"], "margin": 0.15}  # the command line wins over the file
    assert {k: meta["prompt"][k] for k in chosen} == chosen
    assert meta["auto_settings"]["command_line"] == ["margin"] and meta["prompt"]["settings"].endswith("best.auto.json")
    assert len(pd.read_csv(ev / "per_image.csv")) == 4  # every test frame a row, misses included
    pred = tmp_path / "pred"
    run_cli("polypsam.predict", f"ckpt_path={run}", "prompt=auto", f"input={small_root / 'TestDataset' / 'Kvasir'}"
            "/images", f"output={pred}", "num_workers=0", "progress=false", tmp=tmp_path)
    summary = json.loads((pred / "summary.json").read_text())
    assert summary["auto_settings"]["chosen"] == doc["chosen"] and summary["predicted"] == 3
