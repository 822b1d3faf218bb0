"""Prompt types: boxes and clicks from masks, the seeded evaluation draw, the registry's errors, and the
parameters each type leaves without a gradient (frozen so that DDP needs no find_unused_parameters)."""

import numpy as np
import pytest
import torch

from polypsam.errors import ConfigError
from polypsam.geometry import Resize, box_from_mask
from polypsam.models import build_model
from polypsam.models.freeze import freeze_strategy
from polypsam.prompts import PromptSet, available_prompts, build_prompt, collate_prompts, seeded_rng
from polypsam.prompts.box import BoxPrompt
from polypsam.prompts.mixed import MixedPrompt
from polypsam.prompts.none import NonePrompt
from polypsam.prompts.point import PointPrompt, farthest_interior_point


def ellipse(h, w, cy, cx, ay, ax) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= 1.0


def two_polyps_and_a_speck() -> np.ndarray:
    m = ellipse(120, 160, 50, 60, 20, 30) | ellipse(120, 160, 95, 130, 10, 15)
    m[0, 0] = True  # the stray corner pixel of many Kvasir masks
    return m


def test_box_modes_min_area_and_seeded_jitter():
    m = two_polyps_and_a_speck()
    rng = seeded_rng(0, "a/b")
    literal = BoxPrompt().make(m, rng, noisy=False).boxes
    assert np.array_equal(literal, box_from_mask(m)[None]) and literal[0, 0] == 0  # the paper's box: the corner too
    clean = BoxPrompt(min_area=16).make(m, rng).boxes
    assert clean.shape == (1, 4) and clean[0, 0] == 30 and clean[0, 1] == 30  # the speck is ignored
    comps = BoxPrompt(mode="per_component", min_area=16).make(m, rng).boxes
    assert len(comps) == 2 and comps[0, 2] - comps[0, 0] > comps[1, 2] - comps[1, 0]  # largest first
    assert len(BoxPrompt(mode="per_component").make(m, rng).boxes) == 3  # min_area 0: the speck has a box
    jit = BoxPrompt(jitter_frac=0.1)

    def draw(key, seed=0):
        return jit.make(m, seeded_rng(seed, key, 0.1)).boxes

    assert np.array_equal(draw("a/b"), draw("a/b"))  # seeded by (seed, noise, image)
    assert not np.array_equal(draw("a/b"), draw("a/c")) and not np.array_equal(draw("a/b"), draw("a/b", 1))
    side = np.array([literal[0, 2] - literal[0, 0] + 1, literal[0, 3] - literal[0, 1] + 1] * 2)
    assert np.all(np.abs(draw("a/b")[0] - literal[0]) <= 0.1 * side + 1e-4) and not np.allclose(draw("a/b"), literal)
    assert np.array_equal(jit.make(m, rng, noisy=False).boxes, literal)  # noise is for training and sweeps
    assert BoxPrompt().make(np.zeros((10, 10), bool), rng).boxes.shape == (0, 4)
    assert jit.with_noise(0.2).jitter_frac == 0.2 and jit.without_noise().jitter_frac == 0.0


def test_points_start_at_the_centre_and_sample_inside_and_outside():
    m = ellipse(100, 140, 40, 70, 25, 35)
    x, y = farthest_interior_point(m)
    assert abs(x - 70) <= 1 and abs(y - 40) <= 1
    p = PointPrompt(num_positive=3, num_negative=2).make(m, seeded_rng(0, "k"))
    assert p.points.shape == (1, 5, 2) and p.labels.tolist() == [[1, 1, 1, 0, 0]]
    xy = p.points[0].astype(int)
    assert m[xy[:3, 1], xy[:3, 0]].all() and not m[xy[3:, 1], xy[3:, 0]].any()
    again = PointPrompt(num_positive=3, num_negative=2).make(m, seeded_rng(0, "k"))
    assert np.array_equal(p.points, again.points)
    # the corner speck gets no click once min_area ignores it, even when it is the farthest-from-boundary pixel
    speck = np.zeros((50, 50), bool)
    speck[40:44, 40:44] = True
    speck[0:2, 0:2] = True
    assert PointPrompt(min_area=10).make(speck, seeded_rng(0, "k")).points[0, 0].tolist() == [41.0, 41.0]
    assert len(PointPrompt().make(np.zeros((5, 5), bool), seeded_rng(0, "k"))) == 0


def test_prompt_sets_scale_and_collate():
    rz = Resize((100, 200), (50, 100), 128)
    boxes = PromptSet(boxes=np.array([[10, 20, 110, 60]], np.float32))
    assert boxes.to_input(rz).boxes.tolist() == [[5, 10, 55, 30]]
    assert np.allclose(boxes.to_input(rz).to_original(rz).boxes, boxes.boxes)
    batch = collate_prompts([boxes, PromptSet(boxes=np.zeros((0, 4), np.float32)), boxes])
    assert batch.boxes.shape == (2, 4) and batch.image_index.tolist() == [0, 2] and batch.points is None
    pts = PointPrompt(num_positive=2).make(ellipse(40, 40, 20, 20, 8, 8), seeded_rng(0, "x"))
    pb = collate_prompts([pts, pts])
    assert pb.boxes is None and pb.points.shape == (2, 2, 2) and pb.point_labels.dtype == torch.long
    with pytest.raises(ValueError, match="same kind"):
        collate_prompts([boxes, pts])


def test_registry_names_the_types_and_the_settings():
    assert {"box", "point"} <= set(available_prompts())
    assert build_prompt({"type": "point", "num_positive": 2}) == PointPrompt(num_positive=2)
    assert build_prompt(None) == BoxPrompt()
    with pytest.raises(ConfigError, match=r"prompt=<.*box.*point"):
        build_prompt({"type": "scribble"})
    with pytest.raises(ConfigError, match="unknown setting.*min_component_area.*takes jitter_frac"):
        build_prompt({"type": "box", "min_component_area": 16})
    with pytest.raises(ConfigError, match="prompt.mode"):
        BoxPrompt(mode="points")


@pytest.mark.parametrize("prompt", [BoxPrompt(), BoxPrompt(mode="per_component"), PointPrompt(),
                                    PointPrompt(num_positive=2, num_negative=1), NonePrompt(), MixedPrompt()],
                         ids=str)
def test_frozen_parts_are_exactly_those_the_prompt_never_reaches(prompt):
    """Every parameter the prompt type leaves trainable gets a gradient from a mask loss, and every part it
    freezes would have got none: DDP then needs no find_unused_parameters, and nothing useful is frozen.
    A mixed prompt's batch holds one sample of each option (the decoder then runs both kinds)."""
    net = build_model("tiny", pretrained=False)
    masks = [ellipse(64, 64, 30, 30, 12, 16), ellipse(64, 64, 20, 40, 8, 8) | ellipse(64, 64, 50, 15, 6, 6)]
    rz = Resize((64, 64), (64, 64), 64)
    makers = [p for p, _ in prompt.choices] if isinstance(prompt, MixedPrompt) else [prompt] * len(masks)
    batch = collate_prompts([p.make(m, seeded_rng(0, str(i))).to_input(rz)
                             for i, (p, m) in enumerate(zip(makers, masks))])
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)

    def grads(model):
        model.zero_grad()
        logits, _ = model(images, torch.tensor([[64, 64]] * 2), batch.boxes, batch.image_index,
                          points=batch.point_pairs, prompt_free=batch.prompt_free)
        logits.sum().backward()
        return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters()
                if p.requires_grad}

    reached = grads(net)
    frozen = freeze_strategy(net, [], prompt.unused_parameters)
    for name in frozen:
        assert not any(reached[n] for n in reached if n.startswith(name + ".")), name
    assert all(grads(net).values())  # everything left trainable learns
