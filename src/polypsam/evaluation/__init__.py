"""Evaluation on PraNet's test sets: the library behind ``python -m polypsam.evaluate`` and training's
final evaluation. ``plan`` resolves a config once into an ``EvalPlan`` (network, checkpoint, settings,
proposer, output folder), ``tasks`` runs it, ``runner`` predicts and scores, ``report`` writes the tables
and figures."""

from polypsam.evaluation.plan import EvalPlan, plan_after_training, plan_evaluation
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
           run_plan,
)

__all__ = ["FAILURE_SCORES", "METRICS", "UNREADABLE_CONVENTION", "EvalPlan", "EvalResult", "EvalSettings", "check_test_data",
           "collect_records", "evaluate", "evaluate_after_training", "evaluate_model", "label", "plan_after_training",
           "plan_evaluation", "run_evaluation", "run_identity", "run_plan", "settings_from_cfg"]
