"""Evaluation of editors: metrics (`metrics`) and evaluation sets (`datasets`).

The command-line harness that runs edits over a set and writes the report is ``python -m
infer.evaluate`` (``infer/evaluate.py``).
"""

from editmgt_jax.evaluation import metrics
from editmgt_jax.evaluation.datasets import EvalDataError, EvalItem, EvalSet, open_eval_set

__all__ = ["EvalDataError", "EvalItem", "EvalSet", "metrics", "open_eval_set"]
