"""Parallel decoding with region hold: the EditMGT edit loop as one compiled ``lax.scan``.

Each step runs the guided model once (``sampling.guidance``), proposes a token ``x0`` for every
masked position, forces the source token wherever the consolidated attention map says "not part of
the edit" (region hold, when the ``hold_threshold`` knob is > 0), and re-masks the least confident
proposals following a cosine schedule (``sampling.step``). Static choices come in a
``SamplerConfig``, numbers in ``Knobs`` (traced: a sweep over them compiles once); build both from
one ``SamplerSettings``::

    cfg, knobs = SamplerSettings(steps=12, guidance_scale=3.0, mask_token_id=m).split()
    out = jax.jit(lambda knobs, key, *x: sample(model_fn, cfg, knobs, *x, key=key))(knobs, key, *inputs)

Differences from the reference, all deliberate and documented where they act:

- batched: every sample has its own scores, hold mask, schedule length and cut-off;
- ``freeze_held=True`` makes held tokens final (the reference re-masks them when the model gives the
  source token low confidence, then forces them back while they stay masked);
- re-masking is restricted to positions that were masked entering the step: identical to the
  reference whenever anything is masked, and it keeps an empty inpainting mask from re-masking a
  known token;
- inpainting scales the schedule by each sample's own masked fraction (the reference uses the
  fraction over the whole batch; identical for one edit).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from editmgt_jax.sampling.config import Knobs, ModelFacts, SamplerConfig
from editmgt_jax.sampling.consolidation import consolidate
from editmgt_jax.sampling.guidance import GuidedModel
from editmgt_jax.sampling.step import hold_mask, step_update


@struct.dataclass
class SamplerState:
    """Loop carry.

    Attributes:
      tokens: ``[B, H, W] int32`` current tokens (mask id where unknown).
      keys: ``[B]`` typed PRNG keys (one stream per sample), or ``None`` in greedy mode.
      heat: ``[B, h*w] float32`` running sum of the smoothed edit-region scores (with consolidation).
    """

    tokens: jax.Array
    keys: jax.Array | None = None
    heat: jax.Array | None = None


def per_sample_keys(key, bsz: int) -> jax.Array:
    """``[B]`` typed keys, one PRNG stream per sample.

    A single key (typed, or raw ``uint32[2]``) is split ``bsz`` ways; ``[B]`` keys (typed, or raw
    ``uint32[B, 2]``) are used as given, so sample ``b`` of a batch reproduces a single edit run
    with key ``keys[b:b+1]``.
    """
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.shape == ():
        return jax.random.split(key, bsz)
    if key.shape == (bsz,):
        return key
    raise ValueError(f"key must be one PRNG key or {bsz} keys, got shape {key.shape}")


def score_grid(facts: ModelFacts, n_scores: int, id_grid: tuple[int, int]) -> tuple[int, int]:
    """``(h, w)`` of ``n_scores`` captured scores: the facts' grid, the id grid, or half of it."""
    if facts.score_grid is not None:
        return facts.score_grid
    h, w = id_grid
    if n_scores == h * w:
        return (h, w)
    if h % 2 == 0 and w % 2 == 0 and n_scores == (h // 2) * (w // 2):
        return (h // 2, w // 2)
    raise ValueError(f"cannot infer the score grid of {n_scores} scores on a {h}x{w} id grid; "
                     "set the score_grid setting")


def step(state: SamplerState, i, *, model: GuidedModel, knobs: Knobs, ref_ids: jax.Array,
         start_ratio: jax.Array) -> tuple[SamplerState, dict[str, jax.Array] | None]:
    """Step ``i``: model call, consolidation, region hold (``knobs.hold_threshold``), propose / re-mask;
    returns the new state and, when ``model.cfg.record``, this step's records."""
    cfg = model.cfg
    logits, scores = model(state.tokens, i, knobs)
    cons = hold = None
    if cfg.captures:
        cons = consolidate(scores, score_grid(cfg.model, scores.shape[-1], ref_ids.shape[1:]), ref_ids.shape[1:])
        unknown = (state.tokens == cfg.model.mask_token_id).reshape(cons["upsampled"].shape)
        hold = hold_mask(unknown, cons["upsampled"], knobs.hold_threshold)
    step_keys = None
    if state.keys is not None:
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(state.keys)
    tokens, info = step_update(state.tokens, ref_ids, logits, hold, i, steps=cfg.steps,
                               mask_id=cfg.model.mask_token_id, temperature=knobs.temperatures[i],
                               freeze_held=cfg.freeze_held, start_ratio=start_ratio, keys=step_keys,
                               keep_source=knobs.keep_source)
    heat = state.heat if cons is None else state.heat + cons["smoothed"]
    new = state.replace(tokens=tokens, heat=heat)
    if not cfg.record:
        return new, None
    rec = dict(info, tokens_before=state.tokens, tokens_after=tokens)
    if cons is not None:
        rec.update(score_blocks=scores, score_raw=cons["raw"], score_rescaled=cons["rescaled"],
                   score_smoothed=cons["smoothed"], score_upsampled=cons["upsampled"])
    if cfg.record_logits:
        rec["logits"] = logits
    return new, rec


def sample(model_fn: Callable[..., Any], cfg: SamplerConfig, knobs: Knobs, ref_ids, text_states, pooled,
           neg_text_states=None, neg_pooled=None, *, key=None, micro_conds=None, inpaint_mask=None,
           capture_rows=None) -> dict[str, jax.Array]:
    """Edit ``B`` source images: the whole decode as one ``lax.scan``; callable inside ``jax.jit``.

    Args:
      model_fn: the transformer as a function (contract in ``sampling.guidance``). To jit with the
        parameters and knobs as arguments:
        ``jax.jit(lambda p, knobs, *a: sample(partial(apply, p), cfg, knobs, *a))``.
      cfg: the static choices; knobs: the numbers (``cfg.steps`` temperatures).
      ref_ids: ``[B, H, W] int32`` source-image tokens.
      text_states, pooled: ``[B, L, D]`` / ``[B, P]`` prompt encodings (batch 1 broadcasts).
      neg_text_states, neg_pooled: the negative prompt's, required with guidance (batch 1 broadcasts).
      key: one PRNG key (split per sample) or ``[B]`` keys; required unless ``cfg.greedy``.
      micro_conds: ``[B, 5]``, ``[1, 5]`` or ``[5]`` float; default ``cfg.model.micro_conds``.
      inpaint_mask: ``[B, H, W] bool``, True = regenerate; other positions keep the source token and
        the schedule is scaled by each sample's masked fraction. ``None``: everything is generated.
      capture_rows: ``[B, L]`` weights of the text rows in the captured attention (``None``: all rows,
        as the reference); e.g. the instruction's words without the padding.

    Returns:
      ``tokens [B, H, W] int32``: the final tokens (no mask id remains when anything was masked).
      With consolidation, ``heatmap [B, h, w] float32``: the smoothed edit-region score on the
      transformer's grid, averaged over the steps.
      With ``cfg.record``, per step: ``tokens_before``, ``tokens_after``, ``pred_x0`` (``[steps, B, H, W]
      int32``), ``hold``, ``remask`` (``[steps, B, H*W] bool``), ``selected_probs``
      (``[steps, B, H*W] float32``), ``mask_len`` (``[steps, B] int32``), ``cutoff``
      (``[steps, B] float32``), with consolidation ``score_blocks`` (``[steps, B, n_blocks, h*w]``),
      ``score_raw``, ``score_rescaled``, ``score_smoothed`` (``[steps, B, h*w]``), ``score_upsampled``
      (``[steps, B, H*W]``), and with ``cfg.record_logits`` the guided ``logits`` (``[steps, B, H, W,
      K]``). For ``B == 1`` the batch axis is dropped from the records, giving the layouts of the
      reference fixtures (``[steps, 64, 64]``, ``[steps, 4096]``, ...).
    """
    if not isinstance(cfg, SamplerConfig) or not isinstance(knobs, Knobs):
        raise TypeError("sample(model_fn, cfg, knobs, ref_ids, ...): cfg and knobs come from "
                        "SamplerSettings(...).split()")
    ref_ids = jnp.asarray(ref_ids, jnp.int32)
    bsz, h, w = ref_ids.shape
    if knobs.temperatures.shape != (cfg.steps,):
        raise ValueError(f"knobs carry {knobs.temperatures.shape} temperatures for {cfg.steps} steps; "
                         "build them with the same steps (SamplerSettings.split)")
    knobs = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), knobs)
    model = GuidedModel.bind(model_fn, cfg, ref_ids, text_states, pooled, neg_text_states, neg_pooled, micro_conds,
                             capture_rows)
    mask_id = cfg.model.mask_token_id
    if inpaint_mask is None:
        tokens0 = jnp.full((bsz, h, w), mask_id, jnp.int32)
        start_ratio = jnp.ones((bsz,), jnp.float32)
    else:
        inpaint_mask = jnp.asarray(inpaint_mask, bool).reshape(bsz, h, w)
        tokens0 = jnp.where(inpaint_mask, jnp.int32(mask_id), ref_ids)
        start_ratio = jnp.sum(inpaint_mask, axis=(1, 2)).astype(jnp.float32) / jnp.float32(h * w)
    keys = None
    if not cfg.greedy:
        if key is None:
            raise ValueError("sampling needs a PRNG key (or greedy=True)")
        keys = per_sample_keys(key, bsz)
    heat = jnp.zeros((bsz, model.score_length(tokens0, knobs)), jnp.float32) if cfg.captures else None

    def body(state, i):
        return step(state, i, model=model, knobs=knobs, ref_ids=ref_ids, start_ratio=start_ratio)

    state, records = jax.lax.scan(body, SamplerState(tokens=tokens0, keys=keys, heat=heat),
                                  jnp.arange(cfg.steps, dtype=jnp.int32))
    out = {"tokens": state.tokens}
    if cfg.captures:
        # The edit-region map: the smoothed consolidated score averaged over the steps.
        grid = score_grid(cfg.model, state.heat.shape[-1], (h, w))
        out["heatmap"] = (state.heat / jnp.float32(cfg.steps)).reshape((bsz,) + tuple(grid))
    if cfg.record:
        out.update({k: (v[:, 0] if bsz == 1 else v) for k, v in records.items()})
    return out
