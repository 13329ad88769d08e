"""Periodic work of a training run: what runs after a train step, each with its own period.

The loop (``editmgt_jax.training.loop``) runs, after every step, each :class:`Hook` that is due, in
order: checkpoint (``train.checkpoint_every``), evaluation loss (``train.eval_every``), the task's
own (the editor's held-out edit evaluation, ``train.edit_eval_every``), sample grids
(``train.sample_every``). Before a hook runs, the step still in flight is recorded (its metrics
are fetched one step late), so a hook sees the metrics of every step up to its own.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np


class Run(Protocol):
    """What a hook may use of the run (``loop.RunContext``)."""

    config: Any
    workdir: str
    lead: bool                       # process 0: writes files
    process_count: int
    num_steps: int
    writer: Any                      # metrics_log.MetricWriter

    def exclude_from_throughput(self, seconds: float) -> None:
        """Time spent in a hook that the next throughput figure must not count."""


@dataclasses.dataclass(frozen=True)
class Hook:
    """``run(run, step_no, state)`` after the steps that are multiples of ``every`` (0 = never).

    ``at_end``: also after the last step; ``single_process``: only in single-process runs (the
    held-out edits and the sample grids edit on one host)."""

    name: str
    every: int
    run: Callable[[Run, int, Any], None]
    at_end: bool = False
    single_process: bool = False

    def due(self, step_no: int, num_steps: int, process_count: int) -> bool:
        if not self.every or (self.single_process and process_count != 1):
            return False
        return step_no % self.every == 0 or (self.at_end and step_no == num_steps)


def checkpoint_hook(config, checkpointer, data_iterator) -> Hook:
    """A training checkpoint (state, config, data position) every ``train.checkpoint_every`` steps and
    after the last one (that one is waited for)."""
    def save(run: Run, step_no: int, state) -> None:
        checkpointer.save(step_no, state, run.config, data_iterator, force=step_no == run.num_steps)

    return Hook("checkpoint", int(config.train.checkpoint_every), save, at_end=True)


def eval_hook(config, eval_batches: Callable[[], Any], eval_step: Callable[[Any, Any], Mapping]) -> Hook:
    """The loss and metrics on ``train.eval_batches`` held-out batches every ``train.eval_every`` steps,
    with one fixed key (``seed + 12345``): ``eval/*`` scalars and ``eval_*`` metric rows.
    ``eval_batches()``: the held-out batches, ready for ``eval_step(params, batch)``."""
    import jax

    def evaluate(run: Run, step_no: int, state) -> None:
        key = jax.random.key_data(jax.random.key(int(run.config.seed) + 12345))
        rows = [{k: float(v) for k, v in jax.device_get(eval_step(state.params, batch, key)).items()}
                for batch in eval_batches()]
        ev = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        run.writer.scalars(step_no, "eval", ev)
        if run.lead:
            run.writer.step(step_no, {f"eval_{k}": v for k, v in ev.items()})

    return Hook("eval", int(config.train.eval_every), evaluate)


def samples_hook(config, make_sampler: Callable[[], Any]) -> Hook:
    """A sample grid (``samples/step_N.png`` and a TensorBoard image) every ``train.sample_every``
    steps and after the last one; ``make_sampler()`` builds the task's ``previews.Sampler`` once."""
    sampler: list = []

    def sample(run: Run, step_no: int, state) -> None:
        if not sampler:
            sampler.append(make_sampler())
        grid = sampler[0].grid(state.params)
        if grid is not None and run.lead:
            os.makedirs(os.path.join(run.workdir, "samples"), exist_ok=True)
            from PIL import Image

            Image.fromarray(grid).save(os.path.join(run.workdir, "samples", f"step_{step_no}.png"))
            run.writer.image(step_no, "samples", grid)

    return Hook("samples", int(config.train.sample_every), sample, at_end=True, single_process=True)


__all__ = ["Hook", "Run", "checkpoint_hook", "eval_hook", "samples_hook"]
