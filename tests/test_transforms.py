import numpy as np
import pytest
import torch
from segment_anything.utils.transforms import ResizeLongestSide

from polypsam.geometry import (
    box_from_mask,
    boxes_per_component,
    boxes_to_input,
    boxes_to_original,
    jitter_boxes,
    resize_image,
    resize_mask,
    resized_hw,
    to_original,
)
from polypsam.models import build_model


@pytest.mark.parametrize("hw", [(288, 384), (1072, 1920), (333, 487), (101, 57), (1024, 1024)])
def test_resize_matches_sam(hw):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (*hw, 3), dtype=np.uint8)
    canvas, rz = resize_image(img, 1024)
    ref = ResizeLongestSide(1024).apply_image(img)  # SAM's own resize (PIL bilinear)
    assert rz.input_hw == ref.shape[:2] == resized_hw(*hw, 1024)
    assert np.array_equal(canvas[:ref.shape[0], :ref.shape[1]], ref)
    assert not canvas[ref.shape[0]:].any() and not canvas[:, ref.shape[1]:].any()


def test_normalize_matches_sam_preprocess():
    """Normalising on the device then zeroing the pad equals Sam.preprocess (normalise, then pad)."""
    net = build_model("tiny", attention="stock")
    from segment_anything.modeling import Sam

    sam = Sam(net.image_encoder, net.prompt_encoder, net.mask_decoder)
    img = np.random.default_rng(1).integers(0, 255, (50, 37, 3), dtype=np.uint8)
    canvas, rz = resize_image(img, 64)
    ours = net.normalize(torch.from_numpy(canvas).permute(2, 0, 1)[None], torch.tensor([rz.input_hw]))
    h, w = rz.input_hw
    ref = sam.preprocess(torch.from_numpy(canvas[:h, :w]).permute(2, 0, 1).float())
    assert torch.allclose(ours[0], ref, atol=1e-5)


def test_boxes_round_trip_and_match_sam():
    mask = np.zeros((333, 487), bool)
    mask[40:91, 100:301] = True
    box = box_from_mask(mask)
    assert box.tolist() == [100, 40, 300, 90]
    _, rz = resize_image(np.zeros((333, 487, 3), np.uint8), 1024)
    inp = boxes_to_input(box[None], rz)
    sam_box = ResizeLongestSide(1024).apply_boxes(box[None].astype(np.float64), (333, 487))
    assert np.allclose(inp, sam_box, atol=1e-3)
    assert np.allclose(boxes_to_original(inp, rz), box[None], atol=1e-3)


@pytest.mark.parametrize("hw", [(333, 487), (288, 384), (1072, 1920), (97, 131)])
def test_mask_round_trip_to_original(hw):
    """A prediction equal to the resized ground truth maps back to the original at Dice ~1."""
    yy, xx = np.mgrid[:hw[0], :hw[1]]
    mask = ((yy - hw[0] / 2) / (hw[0] / 3)) ** 2 + ((xx - hw[1] / 2) / (hw[1] / 4)) ** 2 < 1
    _, rz = resize_image(np.zeros((*hw, 3), np.uint8), 256)
    small = torch.from_numpy(resize_mask(mask, rz)).float()
    back = to_original(small, rz).numpy() > 0.5
    assert back.shape == hw
    dice = 2 * (back & mask).sum() / (back.sum() + mask.sum())
    assert dice > 0.97  # 256 px of a 1920 px image: only the boundary is resampled


def test_per_component_boxes_and_jitter():
    mask = np.zeros((100, 120), bool)
    mask[10:30, 10:40] = True
    mask[60:90, 70:110] = True
    mask[0, 119] = True  # a one-pixel speck
    boxes = boxes_per_component(mask, min_area=16)
    assert boxes.tolist() == [[70, 60, 109, 89], [10, 10, 39, 29]]
    rng = np.random.default_rng(0)
    j = jitter_boxes(boxes, mask.shape, rng, fraction=0.1)
    assert not np.allclose(j, boxes)
    assert np.all(np.abs(j - boxes)[:, [0, 2]] <= 0.1 * 40 + 1e-4)
    assert np.all((j[:, 2] > j[:, 0]) & (j[:, 3] > j[:, 1]))
    same = jitter_boxes(boxes, mask.shape, np.random.default_rng(0), fraction=0.1)
    assert np.array_equal(j, same)
