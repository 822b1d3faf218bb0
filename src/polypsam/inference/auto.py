"""``prompt=auto``: two passes of the same inference path, no human in the loop.

Stage 1 decodes the empty prompt (``prompt=none``); ``AutoPrompt.propose`` turns its confident
components into padded boxes; stage 2 decodes those boxes and merges their masks (max of logits). A
frame where stage 1 proposes nothing is a miss: its mask is empty, and it is counted, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polypsam.data.transforms import Resize
from polypsam.errors import ConfigError
from polypsam.inference.predictor import Prediction, Predictor
from polypsam.models.sam import PromptableSAM
from polypsam.prompts import PromptSet
from polypsam.prompts.auto import AutoPrompt


@dataclass
class AutoPrediction:
    """refined: stage 2 per image (its prompts are the proposed boxes with their scores; no box: a miss).
    proposal: stage 1 per image, the prompt-free prediction the boxes came from."""

    refined: list[Prediction]
    proposal: list[Prediction]


class AutoPredictor:
    """The refiner's ``Predictor`` plus a proposer: the same network, or ``prompt.proposer``'s.

    A separate proposer must share the refiner's ``ModelSpec`` (input size, normalisation, resize), since
    both read one preprocessed canvas; when it also shares the image encoder's weights, the refiner's
    embeddings serve both stages and the encoder runs once.
    """

    def __init__(self, refiner: Predictor, prompt: AutoPrompt, proposer: PromptableSAM | None = None):
        self.refiner, self.prompt = refiner, prompt
        self.proposer, self.shared_encoder = refiner, True
        if proposer is not None:
            if proposer.spec != refiner.spec:
                raise ConfigError(
                    f"prompt.proposer={prompt.proposer}: its model {proposer.spec.name!r} "
                    f"({proposer.spec.preprocessing_key()}) differs from the refiner's {refiner.spec.name!r} "
                    f"({refiner.spec.preprocessing_key()}); use a proposer trained with model="
                    f"{refiner.spec.name}, or prompt.proposer=null to propose with the refiner itself.")
            self.proposer = Predictor(proposer, refiner.device, refiner.precision)
            self.shared_encoder = proposer.encoder_fingerprint() == refiner.net.encoder_fingerprint()

    @property
    def spec(self):
        return self.refiner.spec

    def decode(self, embeddings: torch.Tensor, resizes: list[Resize], canvases: torch.Tensor | None = None
               ) -> AutoPrediction:
        """Both stages from the refiner's embeddings (and the canvases when the proposer has its own encoder)."""
        first_emb = embeddings
        if not self.shared_encoder:
            if canvases is None:
                raise ValueError("AutoPredictor.decode: a proposer with its own encoder needs the canvases")
            first_emb = self.proposer.encode(canvases, resizes)
        proposal = self.proposer.decode(first_emb, resizes, [PromptSet(empty=True) for _ in resizes])
        boxes = [self.prompt.propose(p.prob) for p in proposal]
        return AutoPrediction(self.refiner.decode(embeddings, resizes, boxes), proposal)

    def predict(self, canvases: torch.Tensor, resizes: list[Resize]) -> AutoPrediction:
        return self.decode(self.refiner.encode(canvases, resizes), resizes, canvases)
