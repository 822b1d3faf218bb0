"""Evaluation on PraNet's test sets: the library behind ``python -m polypsam.evaluate`` and training's
final evaluation. ``runner`` predicts and scores, ``report`` writes the tables and figures, ``tasks``
turns a config or a checkpoint into an evaluation."""

from polypsam.evaluation.records import collect_records
from polypsam.evaluation.runner import EvalResult, label, run_evaluation
from polypsam.evaluation.settings import (
           FAILURE_SCORES,
           METRICS,
           UNREADABLE_CONVENTION,
           EvalSettings,
           settings_from_cfg,
)
from polypsam.evaluation.tasks import (
           check_test_data,
           evaluate,
           evaluate_after_training,
           evaluate_model,
           run_identity,
)

__all__ = ["FAILURE_SCORES", "METRICS", "UNREADABLE_CONVENTION", "EvalResult", "EvalSettings", "check_test_data",
           "collect_records", "evaluate", "evaluate_after_training", "evaluate_model", "label", "run_evaluation",
           "run_identity", "settings_from_cfg"]
