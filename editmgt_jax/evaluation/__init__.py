"""Evaluation of editors: metrics (`metrics`), evaluation sets (`datasets`), the runs over a set
(`runner`, with the ablation plan in `ablations`) and the report (`report`, `grids`).

The command line is ``python -m infer.evaluate`` (``infer/evaluate.py``).
"""

from editmgt_jax.evaluation import metrics
from editmgt_jax.evaluation.datasets import EvalDataError, EvalItem, EvalSet, open_eval_set

__all__ = ["EvalDataError", "EvalItem", "EvalSet", "metrics", "open_eval_set"]
