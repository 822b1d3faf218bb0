"""Prompts as settings of one place: a registry of prompt types, each deriving SAM prompts from a mask.

A prompt type is a frozen dataclass registered under a name (``prompt=<name>`` in every command). From a
ground-truth or prompt mask it makes a ``PromptSet``: K prompts for one image in original-image pixels,
each of which decodes one mask (the K masks of an image are merged by max). ``collate_prompts`` turns the
sets of a batch, already in the model's input frame, into the tensors SAM's prompt encoder takes.

Randomness: training draws from a generator seeded per worker and epoch; validation and evaluation draw
from ``seeded_rng(seed, image key, noise)``, so a result does not depend on batch size, order or workers.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from polypsam.errors import ConfigError
from polypsam.geometry import Resize

# Parameters that no prompt type reaches when one mask is decoded and the loss is on the mask alone: the
# IoU head (no IoU loss), the three multimask hypernetworks and the mask-prompt downscaler.
SINGLE_MASK_UNUSED = (
    "mask_decoder.iou_prediction_head",
    "mask_decoder.output_hypernetworks_mlps.1",
    "mask_decoder.output_hypernetworks_mlps.2",
    "mask_decoder.output_hypernetworks_mlps.3",
    "prompt_encoder.mask_downscaling",
)


@dataclass
class PromptSet:
    """The K prompts of one image. Boxes, points or both, or the empty prompt; every field has K rows.

    boxes:  (K, 4) float32 XYXY, or None
    points: (K, P, 2) float32 xy, or None
    labels: (K, P) int64, 1 = inside the polyp, 0 = outside; None when points is None
    scores: (K,) float32 confidence of proposed prompts, or None (prompts from ground truth)
    empty:  True: one prompt with neither box nor click, SAM's empty prompt (K = 1, prompt-free)
    """

    boxes: np.ndarray | None = None
    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    scores: np.ndarray | None = None
    empty: bool = False

    def __post_init__(self):
        if (self.points is None) != (self.labels is None):
            raise ValueError("PromptSet: points and labels go together")
        if self.empty and (self.boxes is not None or self.points is not None):
            raise ValueError("PromptSet: the empty prompt has neither boxes nor points")
        ks = {len(a) for a in (self.boxes, self.points) if a is not None}
        if len(ks) > 1:
            raise ValueError(f"PromptSet: boxes and points disagree on the number of prompts ({sorted(ks)})")

    def __len__(self) -> int:
        if self.empty:
            return 1
        return len(self.boxes) if self.boxes is not None else len(self.points) if self.points is not None else 0

    @property
    def kind(self) -> str | None:
        """``box``, ``point``, ``box+point``, ``empty``, or None for no prompt at all."""
        if self.empty:
            return "empty"
        kinds = [k for k, v in (("box", self.boxes), ("point", self.points)) if v is not None and len(v)]
        return "+".join(kinds) or None

    def scaled(self, sx: float, sy: float) -> PromptSet:
        """Coordinates multiplied by (sx, sy): original frame <-> the model's input frame."""
        boxes = None if self.boxes is None else (self.boxes * np.float32([sx, sy, sx, sy])).astype(np.float32)
        points = None if self.points is None else (self.points * np.float32([sx, sy])).astype(np.float32)
        return dataclasses.replace(self, boxes=boxes, points=points)

    def to_input(self, resize: Resize) -> PromptSet:
        """Original-image pixels -> the model's input frame (SAM's ``apply_boxes``/``apply_coords``)."""
        return self.scaled(*resize.scale_xy)

    def to_original(self, resize: Resize) -> PromptSet:
        sx, sy = resize.scale_xy
        return self.scaled(1.0 / sx, 1.0 / sy)

    def as_json(self) -> dict[str, Any]:
        """Rounded lists for per-image JSON records and CSV columns."""
        out: dict[str, Any] = {}
        for name in ("boxes", "points", "labels", "scores"):
            v = getattr(self, name)
            if v is not None:
                out[name] = np.round(v.astype(np.float64), 2).tolist() if v.dtype.kind == "f" else v.tolist()
        return out


@dataclass
class PromptBatch:
    """The prompts of a batch in the model's input frame, as SAM's prompt encoder takes them.

    boxes:        (K, 4) float32, or None
    points:       (K, P, 2) float32, or None
    point_labels: (K, P) int64, or None
    image_index:  (K,) int64: the image of the batch each prompt belongs to
    prompt_free:  (K,) bool: prompts decoded with SAM's empty prompt (their box/point rows are zeros and
                  ignored), or None when none is; mixed-prompt training batches hold both kinds
    """

    image_index: torch.Tensor
    boxes: torch.Tensor | None = None
    points: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    prompt_free: torch.Tensor | None = None

    @property
    def point_pairs(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.points is None else (self.points, self.point_labels)

    def __len__(self) -> int:
        return int(self.image_index.numel())


def collate_prompts(sets: list[PromptSet]) -> PromptBatch:
    """Concatenate per-image prompt sets (input frame) into one batch; images without prompts add none.

    Empty prompts may share a batch with one other kind (mixed-prompt training): they get zero rows in
    that kind's tensors and ``prompt_free`` marks them.
    """
    used = [s for s in sets if len(s)]
    index = torch.cat([torch.full((len(s),), j, dtype=torch.long) for j, s in enumerate(sets)]) if sets \
        else torch.zeros(0, dtype=torch.long)
    kinds = {(s.boxes is not None, s.points is not None) for s in used if not s.empty}
    if len(kinds) > 1:
        raise ValueError("collate_prompts: every image of a batch needs the same kind of prompt (or the "
                         "empty prompt)")
    has_boxes, has_points = kinds.pop() if kinds else (not any(s.empty for s in used), False)
    free = [s.empty for s in used for _ in range(len(s))]
    p = next((s.points.shape[1] for s in used if s.points is not None), 0)
    boxes = points = labels = None
    if has_boxes:
        boxes = torch.from_numpy(np.concatenate(
            [np.zeros((1, 4), np.float32) if s.empty else s.boxes for s in used] or [np.zeros((0, 4))])).float()
    if has_points:
        points = torch.from_numpy(np.concatenate(
            [np.zeros((1, p, 2), np.float32) if s.empty else s.points for s in used])).float()
        labels = torch.from_numpy(np.concatenate(
            [np.ones((1, p), np.int64) if s.empty else s.labels for s in used])).long()
    return PromptBatch(index, boxes, points, labels, torch.tensor(free) if any(free) else None)


def seeded_rng(seed: int, key: str, noise: float = 0.0) -> np.random.Generator:
    """The evaluation draw of one image: depends only on (seed, noise level, image key)."""
    return np.random.default_rng([seed, round(noise * 1e6), zlib.crc32(key.encode())])


class PromptType:
    """Base of the registered prompt types: frozen dataclasses with at least a ``seed`` field."""

    name: ClassVar[str]
    seed: int
    # True: the prompts come from the network itself (``prompt=auto``), not from a mask; such a type
    # cannot train, and evaluation and prediction run it through ``inference.AutoPredictor``
    from_model: ClassVar[bool] = False

    @property
    def stochastic(self) -> bool:
        """Whether ``make`` draws from its generator in training (else training leaves torch's RNG alone)."""
        return True

    def make(self, mask: np.ndarray, rng: np.random.Generator, noisy: bool = True) -> PromptSet:
        """Prompts for one (H, W) bool mask in its pixels; ``noisy=False`` leaves out training noise."""
        raise NotImplementedError

    @property
    def needs_mask(self) -> bool:
        """Whether prompts come from a mask (ground truth, or a prompt mask in prediction)."""
        return True

    @property
    def prompt_free(self) -> bool:
        """Whether this type decodes SAM's empty prompt (always, or for some samples): a checkpoint trained
        without it is flagged when evaluated with such a type."""
        return False

    @property
    def unused_parameters(self) -> tuple[str, ...]:
        """Submodules this prompt type never reaches: frozen so that DDP needs no find_unused_parameters."""
        raise NotImplementedError

    @property
    def noise(self) -> float:
        """Where this prompt sits on the robustness axis (0: exact)."""
        return 0.0

    def with_noise(self, level: float) -> PromptType | None:
        """The same prompt at another noise level (robustness sweep), or None if it has no such axis."""
        return None

    def without_noise(self) -> PromptType:
        return self.with_noise(0.0) or self

    def describe(self) -> str:
        """A sentence for reports."""
        return self.name

    def label(self) -> str:
        """A few words for table columns (``compare``)."""
        return self.name


_REGISTRY: dict[str, type[PromptType]] = {}


def register_prompt(name: str):
    def wrap(cls: type[PromptType]) -> type[PromptType]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_prompts() -> list[str]:
    return sorted(_REGISTRY)


def build_prompt(cfg: Mapping[str, Any] | None) -> PromptType:
    """A prompt type from the ``prompt`` config group (``type`` plus that type's settings)."""
    d = dict(cfg or {"type": "box"})
    kind = d.pop("type", None)
    if kind not in _REGISTRY:
        raise ConfigError(f"prompt type {kind!r}: choose prompt=<{'|'.join(available_prompts())}> "
                          "(one yaml per type under conf/prompt/).")
    cls = _REGISTRY[kind]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ConfigError(f"prompt={kind}: unknown setting(s) {', '.join(unknown)}; "
                          f"prompt={kind} takes {', '.join(sorted(fields))}.")
    return cls(**d)


def prompt_config(prompt: PromptType) -> dict[str, Any]:
    """The config mapping that rebuilds ``prompt`` (checkpoints, results)."""
    return {"type": prompt.name, **dataclasses.asdict(prompt)}
