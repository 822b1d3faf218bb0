"""Prediction for your own images: ``plan`` reads inputs and prompts, ``run`` predicts and writes them."""

from polypsam.prediction.plan import (
           Job,
           Plan,
           check_box,
           list_images,
           load_boxes_csv,
           load_boxes_json,
           plan_jobs,
)
from polypsam.prediction.run import run_prediction

__all__ = ["Job", "Plan", "check_box", "list_images", "load_boxes_csv", "load_boxes_json", "plan_jobs",
           "run_prediction"]
