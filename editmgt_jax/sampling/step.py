"""One decoding step after the model call, as pure functions on arrays: propose, hold, re-mask.

Shapes: ``B`` samples, an ``H x W`` id grid (``N = H*W`` positions), a codebook of ``K`` logits.
Every function is traceable with its numeric arguments (threshold, temperature) as traced scalars.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from editmgt_jax.sampling import schedule

F32_MAX = float(np.finfo(np.float32).max)  # confidence of known tokens: never selected for re-masking
PROB_FLOOR = 1e-20  # probabilities are clamped before the log, as the reference does


# ----------------------------------------------------------------------------- propose
def sample_categorical(key: jax.Array, probs: jax.Array, block: int = 128) -> jax.Array:
    """One draw per row of ``probs [..., K]`` by inverse CDF: one uniform per row, not K Gumbels.

    ``jax.random.categorical`` draws K Gumbel variates per position (33.5M threefry numbers and 67M
    logs per step for a 64x64 grid and an 8192 codebook, most of a step's non-transformer time on
    CPU). Same distribution, different random stream. Two levels keep the float32 cumulative sums
    short: the block is found from the block sums, the token inside it.
    """
    k = probs.shape[-1]
    block = block if k % block == 0 else k
    pb = probs.reshape(probs.shape[:-1] + (k // block, block))
    cum_blocks = jnp.cumsum(jnp.sum(pb, axis=-1), axis=-1)                      # [..., K/block]
    u = jax.random.uniform(key, probs.shape[:-1] + (1,), jnp.float32,
                           minval=float(np.finfo(np.float32).tiny)) * cum_blocks[..., -1:]
    j = jnp.minimum(jnp.sum(cum_blocks < u, axis=-1), k // block - 1)           # the block
    before = jnp.take_along_axis(cum_blocks, j[..., None], axis=-1) - jnp.take_along_axis(
        jnp.sum(pb, axis=-1), j[..., None], axis=-1)                            # mass of earlier blocks
    inside = jnp.cumsum(jnp.take_along_axis(pb, j[..., None, None], axis=-2)[..., 0, :], axis=-1) + before
    i = jnp.minimum(jnp.sum(inside < u, axis=-1), block - 1)
    return j * block + i


def propose_x0(tokens: jax.Array, logits: jax.Array, mask_id: int, keys: jax.Array | None = None):
    """Token proposal ``x0`` for masked positions; known positions keep their token.

    Args:
      tokens: ``[B, H, W] int32``.
      logits: ``[B, H, W, K]`` (guidance already applied); cast to float32.
      mask_id: the mask token id.
      keys: ``[B]`` PRNG keys for categorical sampling from ``softmax(logits)``, or ``None`` for argmax.

    Returns:
      ``(x0 [B, H, W] int32, probs [B, H, W, K] float32)``.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    draw = jnp.argmax(probs, axis=-1) if keys is None else jax.vmap(sample_categorical)(keys, probs)
    return jnp.where(tokens == mask_id, draw.astype(jnp.int32), tokens), probs


# ----------------------------------------------------------------------------- hold
def hold_mask(unknown: jax.Array, score: jax.Array, threshold) -> jax.Array:
    """Region-hold positions: still masked and outside the edit region (``score < threshold``);
    none when ``threshold <= 0`` (region hold off).

    Args:
      unknown: ``[B, N] bool``, masked entering the step.
      score: ``[B, N] float32``, the upsampled consolidated score on the id grid.
      threshold: lambda, a python float or traced float32 scalar.
    Returns:
      ``[B, N] bool``.
    """
    threshold = jnp.asarray(threshold, jnp.float32)
    return unknown & (score < threshold) & (threshold > 0)


def keep_mask(unknown: jax.Array, source_probs: jax.Array, keep) -> jax.Array:
    """Positions the model itself would leave as they are: still masked, and the source token has at
    least probability ``keep`` (none when ``keep <= 0``). Held like region-hold positions: their
    proposal is the source token. Where the model is unsure between keeping a cell and changing
    it, the cell stays the source's; what changes is what the model is sure about.

    Args:
      unknown: ``[B, N] bool``; source_probs: ``[B, N] float32``, the probability of each position's
        source token; keep: a python float or traced float32 scalar in [0, 1].
    """
    keep = jnp.asarray(keep, jnp.float32)
    return unknown & (source_probs >= keep) & (keep > 0)


# ----------------------------------------------------------------------------- re-mask
def gumbel_noise(keys: jax.Array, n: int) -> jax.Array:
    """``[B, n] float32`` Gumbel noise ``-log(-log(u))``, with the reference's 1e-20 clamps."""
    u = jax.vmap(lambda k: jax.random.uniform(k, (n,), jnp.float32))(keys)
    return -jnp.log(jnp.maximum(-jnp.log(jnp.maximum(u, PROB_FLOOR)), PROB_FLOOR))


def remask_lowest(x0: jax.Array, selected_probs: jax.Array, mask_len: jax.Array, candidates: jax.Array,
                  mask_id: int, *, temperature=0.0, noise: jax.Array | None = None):
    """Re-mask the ``mask_len`` least confident proposals of each sample.

    ``confidence = log(max(p, 1e-20)) + temperature * noise``; ``cut = sort(confidence)[mask_len]``;
    candidates with confidence strictly below ``cut`` become the mask id.

    Args:
      x0: ``[B, N] int32`` proposals.
      selected_probs: ``[B, N] float32``, probability of each proposal; positions that must stay
        (known tokens) carry ``F32_MAX``.
      mask_len: ``[B] int32``, in ``[1, #candidates - 1]`` for a meaningful cut.
      candidates: ``[B, N] bool``, positions that may be re-masked.
      temperature: scalar; noise: ``[B, N]`` Gumbel noise or ``None`` (zero).

    Returns:
      ``(tokens [B, N] int32, remask [B, N] bool, cutoff [B] float32)``.
    """
    confidence = jnp.log(jnp.maximum(selected_probs, jnp.float32(PROB_FLOOR)))
    if noise is not None:
        confidence = confidence + jnp.asarray(temperature, jnp.float32) * noise
    ordered = jnp.sort(confidence, axis=-1)
    cutoff = jnp.take_along_axis(ordered, mask_len[:, None].astype(jnp.int32), axis=-1)
    remask = (confidence < cutoff) & candidates
    return jnp.where(remask, jnp.int32(mask_id), x0), remask, cutoff[:, 0]


# ----------------------------------------------------------------------------- the whole step
def step_update(tokens: jax.Array, ref_ids: jax.Array | None, logits: jax.Array, hold: jax.Array | None,
                step, *, steps: int, mask_id: int, temperature=0.0, freeze_held: bool = False,
                start_ratio: jax.Array | None = None, keys: jax.Array | None = None, keep_source=0.0):
    """One decoding step after the model call: propose, hold (``hold``, from :func:`hold_mask`), re-mask.

    Args:
      tokens: ``[B, H, W] int32`` entering the step.
      ref_ids: ``[B, H, W] int32`` source tokens (needed when ``hold`` is given).
      logits: ``[B, H, W, K]`` guidance-combined logits.
      hold: ``[B, H*W] bool`` positions whose proposal is the source token (:func:`hold_mask`), or
        ``None`` (no region hold).
      step: step index ``i`` in ``[0, steps)`` (int or traced int32 scalar).
      steps: the number of steps (static: it sets the mask schedule).
      mask_id: the mask token id.
      temperature: this step's Gumbel-noise temperature (unused without ``keys``).
      freeze_held: held positions become final at once (``SamplerConfig.freeze_held``).
      start_ratio: ``[B] float32`` masked fraction at the start (default 1: a full edit).
      keys: ``[B]`` PRNG keys for this step; ``None`` gives the noise-free (greedy) step.
      keep_source: :func:`keep_mask`'s probability (needs ``ref_ids``; 0 = off), added to ``hold``.

    Returns:
      ``(tokens [B, H, W] int32, info)`` with ``info`` holding ``pred_x0 [B, H, W]``,
      ``hold``, ``remask``, ``selected_probs`` (``[B, H*W]``), ``mask_len`` and ``cutoff`` (``[B]``);
      at the last step the tokens are ``pred_x0``, ``mask_len`` is -1, ``cutoff`` and
      ``selected_probs`` are NaN and nothing is re-masked.
    """
    bsz, h, w = tokens.shape
    n = h * w
    draw_keys = noise_keys = None
    if keys is not None:
        pair = jax.vmap(jax.random.split)(keys)
        draw_keys, noise_keys = pair[:, 0], pair[:, 1]
    if start_ratio is None:
        start_ratio = jnp.ones((bsz,), jnp.float32)

    unknown = (tokens == mask_id).reshape(bsz, n)
    x0, probs = propose_x0(tokens, logits, mask_id, draw_keys)
    x0 = x0.reshape(bsz, n)
    if ref_ids is not None and not (isinstance(keep_source, (int, float)) and keep_source <= 0):
        src = ref_ids.reshape(bsz, n).astype(jnp.int32)
        p_src = jnp.take_along_axis(probs.reshape(bsz, n, -1), src[..., None], axis=-1)[..., 0]
        keep = keep_mask(unknown, p_src, keep_source)
        hold = keep if hold is None else hold | keep
    if hold is not None:
        x0 = jnp.where(hold, ref_ids.reshape(bsz, n).astype(jnp.int32), x0)
    else:
        hold = jnp.zeros_like(unknown)

    # frozen holds count as revealed: neither candidates for re-masking nor in the unknown count
    candidates = unknown & ~hold if freeze_held else unknown
    picked = jnp.take_along_axis(probs.reshape(bsz, n, -1), x0[..., None], axis=-1)[..., 0]
    selected = jnp.where(candidates, picked, jnp.float32(F32_MAX))
    ratios = jnp.asarray(schedule.cosine_mask_ratios(steps))
    mask_len = schedule.step_mask_len(n, ratios[step], start_ratio, jnp.sum(candidates, axis=-1))
    noise = None if noise_keys is None else gumbel_noise(noise_keys, n)
    remasked, remask, cutoff = remask_lowest(x0, selected, mask_len, candidates, mask_id,
                                             temperature=temperature, noise=noise)

    last = jnp.asarray(step) == steps - 1
    nan = jnp.float32(jnp.nan)
    info = dict(
        pred_x0=x0.reshape(bsz, h, w),
        hold=hold,
        remask=remask & ~last,
        selected_probs=jnp.where(last, nan, selected),
        mask_len=jnp.where(last, jnp.int32(-1), mask_len),
        cutoff=jnp.where(last, nan, cutoff),
    )
    return jnp.where(last, x0, remasked).reshape(bsz, h, w), info
