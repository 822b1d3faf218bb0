"""Inference: original images and prompts in, probability maps at the original resolution out.

One path for validation, evaluation, prediction, overlays and benchmarks, kept apart from the training
harness: ``Predictor`` batches images and prompts through a network and its preprocessing spec, and
``original_probabilities`` is the one place where logits on the model canvas become probabilities at
each image's own size. ``AutoPredictor`` runs ``prompt=auto``: a prompt-free pass proposes boxes, a
box-prompted pass refines them.
"""

from polypsam.inference.auto import AutoPrediction, AutoPredictor
from polypsam.inference.items import ImageItems, as_list
from polypsam.inference.predictor import Prediction, Predictor, original_probabilities, preprocess

__all__ = ["AutoPrediction", "AutoPredictor", "ImageItems", "Prediction", "Predictor", "as_list",
           "original_probabilities", "preprocess"]
