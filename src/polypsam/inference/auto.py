"""``prompt=auto``: two passes of the same inference path, no human in the loop.

Stage 1 decodes the empty prompt (``prompt=none``); ``AutoPrompt.proposals`` turns its confident
components into padded boxes; stage 2 scores them (some scores decode each box on its own), keeps some
(``AutoPrompt.kept``), optionally replaces each kept box by the tight box of its own mask
(``AutoPrompt.rebox`` rounds) and decodes the kept boxes together, their masks merged (max of logits).
A frame left with no box is a miss: its mask is empty, and it is counted, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from polypsam.errors import ConfigError
from polypsam.geometry import Resize, box_from_mask
from polypsam.inference.predictor import Prediction, Predictor
from polypsam.metrics import dice_iou
from polypsam.models.sam import PromptableSAM
from polypsam.prompts import PromptSet
from polypsam.prompts.auto import AutoPrompt, Components, Proposals

MASK_THRESHOLD = 0.5  # a proposal's own stage-2 mask, for the agreement score


@dataclass
class AutoPrediction:
    """refined: stage 2 per image (its prompts are the kept boxes with their scores; no box: a miss).
    proposal: stage 1 per image, the prompt-free prediction the boxes came from (blended, ``AutoPrompt.blend``)."""

    refined: list[Prediction]
    proposal: list[Prediction]


class AutoBatch:
    """One batch between the stages: the stage-1 maps, the refiner's embeddings, and what stage 2 has
    computed (components per threshold, decoded box sets, proposal scores), each once however many
    settings ask for it (``refine`` once per setting: the selection command's grid)."""

    def __init__(self, refiner: Predictor, embeddings: torch.Tensor, resizes: list[Resize],
                 proposal: list[Prediction], own: list[Prediction] | None = None, separate: bool = False):
        """proposal: the proposer's prompt-free predictions; separate: the proposer is another network than
        the refiner; own: then the refiner's prompt-free predictions, when a blend under 1 is to come
        (``AutoPrompt.blend`` mixes the two)."""
        self.refiner, self.embeddings, self.resizes, self.proposal = refiner, embeddings, resizes, proposal
        self.own, self.separate = own, separate
        self._maps: dict[tuple[int, float], np.ndarray] = {}
        self._components: dict[tuple[int, float, float], Components] = {}
        self._boxes: dict[tuple[int, bytes], tuple[torch.Tensor, float]] = {}  # one box's logits and IoU
        self._decoded: dict[tuple[int, bytes], Prediction] = {}
        self._parts: dict[tuple[int, float, float, int, bytes], tuple[float, float]] = {}
        self._proposals: dict[tuple, Proposals] = {}  # per image and the settings proposals depend on
        self._tight: dict[tuple[int, bytes], np.ndarray] = {}  # a box -> the tight box of its own stage-2 mask

    def stage1_prob(self, j: int, blend: float) -> np.ndarray:
        """Image j's stage-1 probability: blend x the proposer's + (1 - blend) x the refiner's own (the same
        network without a separate proposer: blending changes nothing)."""
        if blend == 1 or not self.separate:
            return self.proposal[j].prob
        if self.own is None:
            raise ValueError(f"AutoBatch: blend={blend} asked of a batch built without the refiner's own maps; "
                             "pass it to AutoPredictor.stage1(blends=...)")
        if (j, blend) not in self._maps:
            self._maps[(j, blend)] = blend * self.proposal[j].prob + (1 - blend) * self.own[j].prob
        return self._maps[(j, blend)]

    def maps(self, prompt: AutoPrompt) -> list[Prediction]:
        """Stage 1 under ``prompt``'s blend, one prediction per image (the ``none`` companion)."""
        return [Prediction(self.stage1_prob(j, prompt.blend), p.prompts, p.iou) for j, p in enumerate(self.proposal)]

    def components(self, j: int, prompt: AutoPrompt) -> Components:
        key = (j, prompt.threshold, prompt.blend)
        if key not in self._components:
            self._components[key] = prompt.components(self.stage1_prob(j, prompt.blend))
        return self._components[key]

    def proposals(self, j: int, prompt: AutoPrompt) -> Proposals:
        """Image j's proposals: the settings that score and keep them (most of a selection grid) share them."""
        key = (j, prompt.threshold, prompt.blend, prompt.min_area, prompt.min_score, prompt.margin,
               prompt.margin_px, prompt.max_boxes)
        if key not in self._proposals:
            self._proposals[key] = prompt.proposals(self.components(j, prompt))
        return self._proposals[key]

    def _decode_boxes(self, requests: list[tuple[int, np.ndarray]]) -> None:
        """Each (image, box) of the requests not decoded before, in one decoder pass. The prompts of a set
        are decoded independently and merged by the max of their logits (``PromptableSAM.merge``), so a
        set's mask is assembled from its boxes' logits: a box shared by many sets is decoded once."""
        todo: dict[tuple[int, bytes], np.ndarray] = {}
        for j, boxes in requests:
            for b in np.asarray(boxes, np.float32).reshape(-1, 4):
                key = (j, b.tobytes())
                if key not in self._boxes:
                    todo.setdefault(key, b)
        if not todo:
            return
        by_image = [[b for (j, _), b in todo.items() if j == i] for i in range(len(self.resizes))]
        sets = [PromptSet(boxes=np.stack(bs)) if bs else PromptSet() for bs in by_image]
        low, iou, _ = self.refiner.prompt_logits(self.embeddings, self.resizes, sets)
        order = [(i, b.tobytes()) for i, bs in enumerate(by_image) for b in bs]  # the decoder's prompt order
        self._boxes.update((key, (low[k:k + 1], float(iou[k]))) for k, key in enumerate(order))

    def decode(self, requests: list[tuple[int, np.ndarray]]) -> list[Prediction]:
        """Stage-2 predictions of (image, boxes) pairs, each set merged from its boxes' logits once."""
        self._decode_boxes(requests)
        keys = [(j, np.ascontiguousarray(b, np.float32).tobytes()) for j, b in requests]
        todo = {k: (j, np.asarray(b, np.float32).reshape(-1, 4)) for k, (j, b) in zip(keys, requests)
                if k not in self._decoded}
        full = [(k, j, b) for k, (j, b) in todo.items() if len(b)]
        for k, (j, b) in todo.items():  # a set with no box: a miss, an empty mask of the frame's size
            if not len(b):
                self._decoded[k] = Prediction(np.zeros(self.resizes[j].original_hw, np.float32),
                                              PromptSet(boxes=b), np.zeros(0, np.float32))
        if full:
            parts = [self._boxes[(j, x.tobytes())] for _, j, b in full for x in b]
            index = np.repeat(np.arange(len(full)), [len(b) for _, _, b in full])  # set n's boxes -> "image" n
            preds = self.refiner.assemble(torch.cat([lo for lo, _ in parts]), np.asarray([i for _, i in parts],
                                          np.float32), index, [self.resizes[j] for _, j, _ in full],
                                          [PromptSet(boxes=b) for _, _, b in full])
            self._decoded.update((k, pred) for (k, _, _), pred in zip(full, preds))
        return [self._decoded[k] for k in keys]

    def _score_parts(self, j: int, prompt: AutoPrompt, comps: Components, props: Proposals
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Per proposal: IoU of its own stage-2 mask with its component, and SAM's predicted IoU."""
        keys = [(j, prompt.threshold, prompt.blend, int(i), b.tobytes()) for i, b in zip(props.ids, props.boxes)]
        if any(k not in self._parts for k in keys):
            alone = self.decode([(j, b[None]) for b in props.boxes])  # each box on its own
            for k, i, pred in zip(keys, props.ids, alone):
                self._parts[k] = (dice_iou(pred.prob > MASK_THRESHOLD, comps.labels == i)[1], float(pred.iou[0]))
        parts = np.asarray([self._parts[k] for k in keys], np.float32).reshape(-1, 2)
        return parts[:, 0], parts[:, 1]

    def rebox(self, picks: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """One box -> mask -> box round: per image, each box becomes the tight box of its own stage-2 mask
        (the box stays when that mask is empty); the scores stay with their boxes."""
        todo = [(j, b) for j, (boxes, _) in enumerate(picks) for b in boxes if (j, b.tobytes()) not in self._tight]
        for (j, b), pred in zip(todo, self.decode([(j, b[None]) for j, b in todo])):  # one decoder pass
            tight = box_from_mask(pred.prob > MASK_THRESHOLD)
            self._tight[(j, b.tobytes())] = b if tight is None else np.asarray(tight, np.float32)
        return [(np.asarray([self._tight[(j, b.tobytes())] for b in boxes], np.float32).reshape(-1, 4), scores)
                for j, (boxes, scores) in enumerate(picks)]

    def refine(self, prompt: AutoPrompt) -> list[Prediction]:
        """Stage 2 under ``prompt``'s settings: per image the kept boxes, their scores and merged mask."""
        picks = []
        for j in range(len(self.proposal)):
            comps = self.components(j, prompt)
            props = self.proposals(j, prompt)
            agreement = iou = None
            if prompt.scores_after_refinement and len(props.ids):
                agreement, iou = self._score_parts(j, prompt, comps, props)
            scores = prompt.combine(props.mean_prob, agreement, iou) if len(props.ids) else props.mean_prob
            keep = prompt.kept(scores)
            picks.append((props.boxes[keep], scores[keep]))
        for _ in range(prompt.rebox):
            picks = self.rebox(picks)
        merged = self.decode([(j, boxes) for j, (boxes, _) in enumerate(picks)])
        return [Prediction(m.prob, PromptSet(boxes=b, scores=s), m.iou) for m, (b, s) in zip(merged, picks)]


class AutoPredictor:
    """The refiner's ``Predictor`` plus a proposer: the same network, or ``prompt.proposer``'s (a SAM
    trained prompt-free, or a prompt-free baseline).

    A separate proposer must take the refiner's input size (one ``Resize`` maps both stages back); it may
    resize and normalise its own way (a U-Net trained with PIL's bilinear resize proposing for LiteMedSAM's
    area resize): then ``proposer_spec`` is set, ``ImageItems`` makes its canvas beside the refiner's, and
    ``stage1_canvases`` hands it over. When the proposer shares the image encoder's weights, the refiner's
    embeddings serve both stages and the encoder runs once.
    """

    def __init__(self, refiner: Predictor, prompt: AutoPrompt, proposer: PromptableSAM | None = None):
        self.refiner, self.prompt = refiner, prompt
        self.proposer, self.shared_encoder, self.proposer_spec = refiner, True, None
        if proposer is not None:
            if proposer.spec.image_size != refiner.spec.image_size:
                raise ConfigError(
                    f"prompt.proposer={prompt.proposer}: its model {proposer.spec.name!r} takes "
                    f"{proposer.spec.image_size} px inputs, the refiner {refiner.spec.name!r} "
                    f"{refiner.spec.image_size} px; use a proposer trained at model.image_size="
                    f"{refiner.spec.image_size}, or prompt.proposer=null to propose with the refiner itself.")
            if proposer.spec.resize_method != refiner.spec.resize_method:  # same size: only the resize differs
                self.proposer_spec = proposer.spec
            self.proposer = Predictor(proposer, refiner.device, refiner.precision)
            self.shared_encoder = proposer.encoder_fingerprint() == refiner.net.encoder_fingerprint()

    def stage1_canvases(self, items: list[dict]) -> torch.Tensor:
        """The (B,3,S,S) canvases stage 1 reads: the proposer's own (``ImageItems(proposer_spec=...)``) when
        it resizes another way than the refiner, else the refiner's."""
        if self.proposer_spec is None:
            return torch.stack([it["canvas"] for it in items])
        if any("proposer_canvas" not in it for it in items):
            raise ValueError("AutoPredictor: the proposer reads its own canvas; build the items with "
                             "ImageItems(..., proposer_spec=auto.proposer_spec)")
        return torch.stack([it["proposer_canvas"] for it in items])

    @property
    def spec(self):
        return self.refiner.spec

    def stage1(self, embeddings: torch.Tensor, resizes: list[Resize], canvases: torch.Tensor | None = None,
               blends: tuple[float, ...] | None = None) -> AutoBatch:
        """Stage 1 from the refiner's embeddings, or, when the proposer has its own encoder, from
        ``canvases`` (``stage1_canvases``). ``blends``: the blends the batch will be asked for (default: this
        predictor's); the refiner's own map is decoded only when one is under 1."""
        first_emb = embeddings
        if not self.shared_encoder:
            if canvases is None:
                raise ValueError("AutoPredictor.stage1: a proposer with its own encoder needs the canvases")
            first_emb = self.proposer.encode(canvases, resizes)
        empty = [PromptSet(empty=True) for _ in resizes]
        proposal = self.proposer.decode(first_emb, resizes, empty)
        # a separate proposer blended with the refiner: its own prompt-free maps too (one more decoder pass)
        separate = self.proposer is not self.refiner
        own = self.refiner.decode(embeddings, resizes, empty) if separate and min(
            blends or (self.prompt.blend,)) < 1 else None
        return AutoBatch(self.refiner, embeddings, resizes, proposal, own, separate)

    def decode(self, embeddings: torch.Tensor, resizes: list[Resize], canvases: torch.Tensor | None = None
               ) -> AutoPrediction:
        """Both stages under this predictor's settings."""
        batch = self.stage1(embeddings, resizes, canvases)
        return AutoPrediction(batch.refine(self.prompt), batch.maps(self.prompt))

    def predict(self, canvases: torch.Tensor, resizes: list[Resize], stage1_canvases: torch.Tensor | None = None
                ) -> AutoPrediction:
        """Both stages from the refiner's canvases (and the proposer's, ``stage1_canvases``, when it has its own)."""
        if self.proposer_spec is not None and stage1_canvases is None:
            raise ValueError("AutoPredictor.predict: the proposer reads its own canvas; pass stage1_canvases")
        emb = self.refiner.encode(canvases, resizes)
        return self.decode(emb, resizes, canvases if stage1_canvases is None else stage1_canvases)
