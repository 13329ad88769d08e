"""Checks of a training config and workdir made before anything is opened, created or compiled, so
a value the run cannot use is one line naming the field (``train.main``: ``error: ...``, exit
status 2) and leaves nothing behind."""

from __future__ import annotations

import math


class TrainConfigError(ValueError):
    """A config field or the workdir cannot be used; the message names it."""


def _integer(config, field: str, low: int, why: str = "") -> None:
    value = config
    for part in field.split("."):
        value = value.get(part) if hasattr(value, "get") else None
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TrainConfigError(f"--config.{field}={value}: must be an integer >= {low}{why}")


def check_train_config(config) -> None:
    """``TrainConfigError`` for fields no run can use: step counts and intervals, batch size,
    resolution, the learning rate and its schedule."""
    for field, low, why in [
            ("train.batch_size", 1, ""), ("train.num_steps", 1, " (the optimizer steps to run)"),
            ("train.checkpoint_every", 1, ""), ("train.log_every", 1, ""), ("train.keep_checkpoints", 1, ""),
            ("train.eval_every", 0, " (0 = off)"), ("train.eval_batches", 1, ""),
            ("train.edit_eval_every", 0, " (0 = off)"), ("train.sample_every", 0, " (0 = off)"),
            ("train.num_samples", 1, ""), ("train.sample_steps", 1, ""), ("data.resolution", 1, ""),
            ("optim.grad_accum_steps", 1, ""), ("optim.warmup_steps", 0, ""), ("optim.decay_steps", 0, "")]:
        _integer(config, field, low, why)
    lr = config.optim.get("learning_rate")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr < 0:
        raise TrainConfigError(f"--config.optim.learning_rate={lr}: must be a finite number >= 0")
    from editmgt_jax.training.state import make_lr_schedule

    try:
        make_lr_schedule(config.optim)
    except ValueError as e:
        raise TrainConfigError(f"--config.{e}") from None


def check_workdir(workdir: str) -> None:
    """``TrainConfigError`` unless ``workdir`` is a writable folder or can be created as one."""
    from editmgt_jax.folders import unwritable

    why = unwritable(workdir, folder=True)
    if why:
        raise TrainConfigError(f"--workdir {workdir}: {why}")
