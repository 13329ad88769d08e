"""Mask and temperature schedules of the parallel decoder, and the training mask ratio.

The inference tables depend only on the (static) number of steps, so they are computed once in
numpy float32, the precision the reference scheduler uses, and enter the compiled loop as constants.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def cosine_mask_ratios(steps: int) -> np.ndarray:
    """Fraction of tokens left masked after each step: ``cos(pi/2 * (i+1)/steps)``.

    Returns ``[steps] float32``. Evaluated in float32 in the reference's order: ``(i+1)/steps``,
    times ``float32(pi)``, halved, cosine. The last entry (about -4e-8) is never used: the last
    step re-masks nothing.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ratio = (np.arange(steps, dtype=np.float32) + np.float32(1)) / np.float32(steps)
    return np.cos(ratio * np.float32(math.pi) / np.float32(2)).astype(np.float32)


def mask_len_table(num_tokens: int, steps: int) -> np.ndarray:
    """Unclamped mask lengths ``floor(num_tokens * cos(pi/2 * (i+1)/steps))``, ``[steps] int32``.

    For 4096 tokens and 4 steps: ``[3784, 2896, 1567, -1]``; the last entry is unused (the last
    step re-masks nothing).
    """
    return np.floor(np.float32(num_tokens) * cosine_mask_ratios(steps)).astype(np.int32)


def step_mask_len(num_tokens: int, mask_ratio, start_ratio, num_unknown):
    """Number of positions to re-mask at one (non-final) step, per sample.

    Args:
      num_tokens: static number of token positions per sample (``H * W``).
      mask_ratio: scalar float32, this step's entry of :func:`cosine_mask_ratios`.
      start_ratio: ``[B] float32``, the fraction of positions masked at the start (1 for a
        full edit, the user-mask fraction for inpainting); scales the schedule.
      num_unknown: ``[B] int32``, positions still masked entering the step.

    Returns:
      ``[B] int32``: ``floor(num_tokens * start_ratio * mask_ratio)`` clamped to
      ``[1, num_unknown - 1]`` (never re-mask everything that was masked, always at least one).
    """
    ratio = jnp.asarray(start_ratio, jnp.float32) * jnp.asarray(mask_ratio, jnp.float32)
    length = jnp.floor(jnp.float32(num_tokens) * ratio).astype(jnp.int32)
    return jnp.maximum(1, jnp.minimum(num_unknown.astype(jnp.int32) - 1, length))


def temperature_schedule(steps: int, start: float, end: float) -> np.ndarray:
    """Gumbel-noise temperatures ``linspace(start, end, steps)``, ``[steps] float32``.

    Evaluated as ``torch.linspace`` does in float32 (first half counted up from ``start``, second
    half down from ``end``), so ``(2, 0, 4)`` gives ``[2, 1.3333333, 0.6666667, 0]``.
    """
    if steps == 1:
        return np.array([start], np.float32)
    start32, end32 = np.float32(start), np.float32(end)
    step = (end32 - start32) / np.float32(steps - 1)
    i = np.arange(steps)
    lower = start32 + step * i.astype(np.float32)
    upper = end32 - step * (steps - 1 - i).astype(np.float32)
    return np.where(i < steps // 2, lower, upper).astype(np.float32)

