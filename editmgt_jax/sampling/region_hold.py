"""Parallel decoding with region hold: the EditMGT edit loop as one compiled ``fori_loop``.

Each step runs the transformer once (twice the batch with classifier-free guidance), proposes a token
``x0`` for every masked position, optionally forces the source token wherever the consolidated
attention map says "not part of the edit" (region hold), and re-masks the least confident proposals
following a cosine schedule. The loop is written against a model function, so any transformer that
honours this contract plugs in::

    model_fn(ids, ref_ids, text_states, pooled, micro_conds, timestep, *,
             reference_strength, capture_blocks, capture_mode)
        -> (logits [N, H, W, K] float32, scores [N, len(capture_blocks), h*w] float32 or None)

``ids`` / ``ref_ids`` are ``[N, H, W] int32`` (``SamplerConfig.mask_token_id`` where unknown: an
embedding row outside the codebook, named by the model checkpoint's conventions), ``timestep``
is ``[N] int32``: the step index counting down (``steps-1 .. 0``), as the reference pipeline passes it.
``scores`` are the text-to-image attention of the ``capture_blocks`` (global block indices), averaged
over heads and text rows, on the transformer's ``h x w`` grid.

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

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from editmgt_jax.sampling import schedule
from editmgt_jax.sampling.consolidation import consolidate

TIMESTEP_CONVENTIONS = ("step_index", "mask_fraction")

F32_MAX = float(np.finfo(np.float32).max)  # confidence of known tokens: never selected for re-masking
PROB_FLOOR = 1e-20  # probabilities are clamped before the log, as the reference does


# Numeric settings: (lowest allowed value, whether the lowest value itself is allowed). Every one
# must also be finite; guidance_scale <= 1 means no guidance.
NUMERIC_RANGES = {"steps": (1, True), "guidance_scale": (0.0, True), "reference_strength": (0.0, False),
                  "hold_threshold": (0.0, True), "temperature_start": (0.0, True), "temperature_end": (0.0, True)}


def check_setting(name: str, value) -> None:
    """Raise ``ValueError("name=value: ...")`` unless ``value`` is allowed for numeric setting ``name``."""
    lo, inclusive = NUMERIC_RANGES[name]
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, (bool, str)) or (name == "steps" and not number.is_integer()):
        raise ValueError(f"{name}={value!r}: must be {'an integer' if name == 'steps' else 'a number'}")
    if not np.isfinite(number) or number < lo or (number == lo and not inclusive):
        raise ValueError(f"{name}={value!r}: must be {'an integer' if name == 'steps' else 'finite and'} "
                         f"{'>=' if inclusive else '>'} {lo:g}")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static sampler settings; hashable, so one configuration and input shape compile once.

    Attributes:
      steps: number of decoding steps (36 in the released demo).
      guidance_scale: classifier-free guidance scale; ``<= 1`` runs the conditional batch only.
      reference_strength: passed to the model (``log(s)`` attention bias between the source and
        the other tokens).
      hold_threshold: region-hold threshold lambda on the upsampled edit score; 0 = no hold.
      consolidation_blocks: global block indices whose attention is captured (dual-stream blocks
        first, then single-stream blocks numbered from the number of dual blocks); empty = off.
        Region hold needs both this and ``hold_threshold > 0``.
      capture_mode: how the model computes the captured attention; 'official' is the reference's
        recomputation over [text, image] tokens only.
      greedy: argmax proposals and zero Gumbel noise (deterministic; what the parity fixtures use).
      freeze_held: False (reference): a held position carries the model's probability of the source
        token as its confidence, so it can be re-masked and is forced back to the source only while
        it stays masked and below lambda; a later step with a higher score can replace it. True: held
        positions become known tokens at once, are never re-masked or revisited, and leave the
        schedule (``mask_len`` is clamped to the still-free masked positions).
      temperature_start, temperature_end: Gumbel-noise temperature, linear over the steps.
      micro_conds: ``[width, height, crop_top, crop_left, aesthetic]`` used when the caller passes none.
      mask_token_id: the mask id, as the model checkpoint's conventions name it
        (``editmgt_jax.checkpoints.read_conventions``; the release: 8255, its scheduler config's).
        Required by :func:`sample`; never the logits width (the codebook size).
      score_grid: ``(h, w)`` of the captured scores; ``None`` infers it (the id grid, or half of it
        when the transformer downsamples by 2).
      timestep_convention: what the transformer gets as its timestep. ``"step_index"`` (the
        release's sampler): the integer ``steps - 1 - step``. ``"mask_fraction"`` (models trained here,
        see ``editmgt_jax.training.losses``): the fraction of still-masked tokens of each image before
        the step, a float in [0, 1]. A checkpoint records which one it was trained for.
    """

    steps: int = 36
    guidance_scale: float = 6.0
    reference_strength: float = 1.1
    hold_threshold: float = 0.0
    consolidation_blocks: tuple[int, ...] = ()
    capture_mode: str = "official"
    greedy: bool = False
    freeze_held: bool = False
    temperature_start: float = 2.0
    temperature_end: float = 0.0
    micro_conds: tuple[float, ...] = (1024.0, 1024.0, 0.0, 0.0, 6.0)
    mask_token_id: int | None = None
    score_grid: tuple[int, int] | None = None
    timestep_convention: str = "step_index"

    def __post_init__(self):
        object.__setattr__(self, "consolidation_blocks", tuple(int(b) for b in self.consolidation_blocks))
        object.__setattr__(self, "micro_conds", tuple(float(m) for m in self.micro_conds))
        if self.score_grid is not None:
            object.__setattr__(self, "score_grid", tuple(int(g) for g in self.score_grid))
        for name in NUMERIC_RANGES:
            check_setting(name, getattr(self, name))
        if min(self.consolidation_blocks, default=0) < 0:
            raise ValueError(f"consolidation_blocks={self.consolidation_blocks}: block indices are >= 0")
        if not np.all(np.isfinite(self.micro_conds)):
            raise ValueError(f"micro_conds={self.micro_conds}: must be finite")
        if self.hold_threshold > 0 and not self.consolidation_blocks:
            raise ValueError("region hold (hold_threshold > 0) needs consolidation_blocks")
        if len(self.micro_conds) != 5:
            raise ValueError(f"micro_conds needs 5 values, got {self.micro_conds}")
        if self.timestep_convention not in TIMESTEP_CONVENTIONS:
            raise ValueError(f"timestep_convention must be one of {TIMESTEP_CONVENTIONS}, "
                             f"got {self.timestep_convention!r}")

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def captures(self) -> bool:
        return bool(self.consolidation_blocks)

    @property
    def holds(self) -> bool:
        return self.hold_threshold > 0 and self.captures


@struct.dataclass
class SamplerState:
    """Loop carry.

    Attributes:
      tokens: ``[B, H, W] int32`` current tokens (mask id where unknown).
      keys: ``[B]`` typed PRNG keys (one stream per sample), or ``None`` in greedy mode.
      records: per-step intermediates, each ``[steps, B, ...]``, or ``None`` (the lean path).
      heat: ``[B, h*w] float32`` running sum of the smoothed edit-region scores (with consolidation).
    """

    tokens: jax.Array
    keys: jax.Array | None = None
    records: dict[str, jax.Array] | None = None
    heat: jax.Array | None = None


# ----------------------------------------------------------------------------- one step, in pieces
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
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    if keys is None:
        draw = jnp.argmax(probs, axis=-1)
    else:
        draw = jax.vmap(sample_categorical)(keys, probs)
    return jnp.where(tokens == mask_id, draw.astype(jnp.int32), tokens), probs


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


def hold_mask(unknown: jax.Array, score: jax.Array, threshold: float) -> jax.Array:
    """Region-hold positions: still masked and outside the edit region (``score < threshold``).

    Args:
      unknown: ``[B, N] bool``, masked entering the step.
      score: ``[B, N] float32``, the upsampled consolidated score on the id grid.
    Returns:
      ``[B, N] bool``.
    """
    return unknown & (score < jnp.float32(threshold))


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


def step_update(tokens: jax.Array, ref_ids: jax.Array | None, logits: jax.Array, score: jax.Array | None,
                step, cfg: SamplerConfig, *, mask_id: int, start_ratio: jax.Array | None = None,
                keys: jax.Array | None = None):
    """One decoding step after the model call: propose, hold, re-mask.

    Args:
      tokens: ``[B, H, W] int32`` entering the step.
      ref_ids: ``[B, H, W] int32`` source tokens (needed when ``score`` is given).
      logits: ``[B, H, W, K]`` guidance-combined logits.
      score: ``[B, H*W] float32`` upsampled edit score, or ``None`` (no region hold this step).
      step: step index ``i`` in ``[0, cfg.steps)`` (int or traced int32 scalar).
      cfg: uses ``steps``, ``hold_threshold``, ``freeze_held``, ``greedy`` and the temperatures.
      mask_id: the mask token id.
      start_ratio: ``[B] float32`` masked fraction at the start (default 1: a full edit).
      keys: ``[B]`` PRNG keys for this step; ``None`` or ``cfg.greedy`` gives the noise-free step.

    Returns:
      ``(tokens [B, H, W] int32, info)`` with ``info`` holding ``pred_x0 [B, H, W]``,
      ``hold``, ``remask``, ``selected_probs`` (``[B, H*W]``), ``mask_len`` and ``cutoff`` (``[B]``);
      at the last step the tokens are ``pred_x0``, ``mask_len`` is -1, ``cutoff`` and
      ``selected_probs`` are NaN and nothing is re-masked.
    """
    bsz, h, w = tokens.shape
    n = h * w
    if cfg.greedy:
        keys = None
    if keys is not None:
        pair = jax.vmap(jax.random.split)(keys)
        draw_keys, noise_keys = pair[:, 0], pair[:, 1]
    else:
        draw_keys = noise_keys = None
    if start_ratio is None:
        start_ratio = jnp.ones((bsz,), jnp.float32)

    unknown = (tokens == mask_id).reshape(bsz, n)
    x0, probs = propose_x0(tokens, logits, mask_id, draw_keys)
    x0 = x0.reshape(bsz, n)
    if score is not None:
        hold = hold_mask(unknown, score.reshape(bsz, n), cfg.hold_threshold)
        x0 = jnp.where(hold, ref_ids.reshape(bsz, n).astype(jnp.int32), x0)
    else:
        hold = jnp.zeros_like(unknown)

    # frozen holds count as revealed: neither candidates for re-masking nor in the unknown count
    candidates = unknown & ~hold if cfg.freeze_held else unknown
    picked = jnp.take_along_axis(probs.reshape(bsz, n, -1), x0[..., None], axis=-1)[..., 0]
    selected = jnp.where(candidates, picked, jnp.float32(F32_MAX))
    ratios = jnp.asarray(schedule.cosine_mask_ratios(cfg.steps))
    temps = jnp.asarray(schedule.temperature_schedule(cfg.steps, cfg.temperature_start, cfg.temperature_end))
    mask_len = schedule.step_mask_len(n, ratios[step], start_ratio, jnp.sum(candidates, axis=-1))
    noise = None if noise_keys is None else gumbel_noise(noise_keys, n)
    remasked, remask, cutoff = remask_lowest(x0, selected, mask_len, candidates, mask_id,
                                             temperature=temps[step], noise=noise)

    last = jnp.asarray(step) == cfg.steps - 1
    nan = jnp.float32(jnp.nan)
    info = dict(
        pred_x0=x0.reshape(bsz, h, w),
        hold=hold,
        remask=remask & ~last,
        selected_probs=jnp.where(last, nan, selected),
        mask_len=jnp.where(last, jnp.int32(-1), mask_len),
        cutoff=jnp.where(last, nan, cutoff),
    )
    new_tokens = jnp.where(last, x0, remasked).reshape(bsz, h, w)
    return new_tokens, info


# ----------------------------------------------------------------------------- the loop
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


def _score_grid(cfg: SamplerConfig, n_scores: int, id_grid: tuple[int, int]) -> tuple[int, int]:
    if cfg.score_grid is not None:
        return cfg.score_grid
    h, w = id_grid
    if n_scores == h * w:
        return (h, w)
    if h % 2 == 0 and w % 2 == 0 and n_scores == (h // 2) * (w // 2):
        return (h // 2, w // 2)
    raise ValueError(f"cannot infer the score grid of {n_scores} scores on a {h}x{w} id grid; "
                     "set SamplerConfig.score_grid")


def _n_scores(call_model, ref_ids) -> int:
    """Length of the captured score vector, from an abstract trace of the model (no compute)."""
    _, sc_shape = jax.eval_shape(lambda r: call_model(r, 0), ref_ids)
    return int(sc_shape.shape[-1])


def _batch_to(x: jax.Array, bsz: int, what: str) -> jax.Array:
    if x.shape[0] == bsz:
        return x
    if x.shape[0] == 1:
        return jnp.broadcast_to(x, (bsz,) + x.shape[1:])
    raise ValueError(f"{what}: batch {x.shape[0]} does not match {bsz}")


def sample(model_fn: Callable[..., Any], ref_ids, text_states, pooled, neg_text_states=None, neg_pooled=None,
           cfg: SamplerConfig = SamplerConfig(), *, key=None, micro_conds=None, inpaint_mask=None,
           record: bool = False, record_logits: bool = False) -> dict[str, jax.Array]:
    """Edit ``B`` source images: the whole decode as one ``lax.fori_loop``; callable inside ``jax.jit``.

    Args:
      model_fn: the transformer as a function (contract in the module docstring). To jit with the
        parameters as arguments: ``jax.jit(lambda p, *a: sample(partial(apply, p), *a, cfg))``.
      ref_ids: ``[B, H, W] int32`` source-image tokens.
      text_states, pooled: ``[B, L, D]`` / ``[B, P]`` prompt encodings (batch 1 broadcasts).
      neg_text_states, neg_pooled: the negative prompt's, required with guidance (batch 1 broadcasts).
      cfg: static settings.
      key: one PRNG key (split per sample) or ``[B]`` keys; required unless ``cfg.greedy``.
      micro_conds: ``[B, 5]``, ``[1, 5]`` or ``[5]`` float; default ``cfg.micro_conds``.
      inpaint_mask: ``[B, H, W] bool``, True = regenerate; other positions keep the source token and
        the schedule is scaled by each sample's masked fraction. ``None``: everything is generated.
      record: also return per-step intermediates (static).
      record_logits: with ``record``, also the guidance-combined logits ``[steps, B, H, W, K]``.

    Returns:
      ``tokens [B, H, W] int32``: the final tokens (no mask id remains when anything was masked).
      With consolidation, ``heatmap [B, h, w] float32``: the smoothed edit-region score on the
      transformer's grid, averaged over the steps.
      With ``record``, per step: ``tokens_before``, ``tokens_after``, ``pred_x0`` (``[steps, B, H, W]
      int32``), ``hold``, ``remask`` (``[steps, B, H*W] bool``), ``selected_probs``
      (``[steps, B, H*W] float32``), ``mask_len`` (``[steps, B] int32``), ``cutoff``
      (``[steps, B] float32``), and with consolidation ``score_blocks`` (``[steps, B, n_blocks, h*w]``),
      ``score_raw``, ``score_rescaled``, ``score_smoothed`` (``[steps, B, h*w]``), ``score_upsampled``
      (``[steps, B, H*W]``). For ``B == 1`` the batch axis is dropped from the records, giving the
      layouts of the reference fixtures (``[steps, 64, 64]``, ``[steps, 4096]``, ...).
    """
    ref_ids = jnp.asarray(ref_ids, jnp.int32)
    bsz, h, w = ref_ids.shape
    n = h * w
    text_states = _batch_to(jnp.asarray(text_states), bsz, "text_states")
    pooled = _batch_to(jnp.asarray(pooled), bsz, "pooled")
    if micro_conds is None:
        micro_conds = jnp.asarray(cfg.micro_conds, jnp.float32)
    micro_conds = jnp.asarray(micro_conds, jnp.float32)
    micro_conds = _batch_to(micro_conds.reshape(-1, micro_conds.shape[-1]), bsz, "micro_conds")

    if cfg.uses_cfg:
        if neg_text_states is None or neg_pooled is None:
            raise ValueError("guidance_scale > 1 needs neg_text_states and neg_pooled")
        neg_text_states = _batch_to(jnp.asarray(neg_text_states), bsz, "neg_text_states")
        neg_pooled = _batch_to(jnp.asarray(neg_pooled), bsz, "neg_pooled")
        model_text = jnp.concatenate([neg_text_states, text_states], axis=0)
        model_pooled = jnp.concatenate([neg_pooled, pooled], axis=0)
        model_micro = jnp.concatenate([micro_conds, micro_conds], axis=0)
        model_ref = jnp.concatenate([ref_ids, ref_ids], axis=0)
    else:
        model_text, model_pooled, model_micro, model_ref = text_states, pooled, micro_conds, ref_ids
    n_model = model_ref.shape[0]

    def call_model(tokens, step, mask_id=None):
        ids = jnp.concatenate([tokens, tokens], axis=0) if cfg.uses_cfg else tokens
        if cfg.timestep_convention == "mask_fraction":
            if mask_id is None:   # shape inference only
                timestep = jnp.ones((n_model,), jnp.float32)
            else:
                timestep = jnp.mean(ids == mask_id, axis=(1, 2), dtype=jnp.float32)
        else:
            timestep = jnp.full((n_model,), cfg.steps - 1 - step, jnp.int32)
        return model_fn(ids, model_ref, model_text, model_pooled, model_micro, timestep,
                        reference_strength=cfg.reference_strength, capture_blocks=cfg.consolidation_blocks,
                        capture_mode=cfg.capture_mode)

    mask_id = cfg.mask_token_id
    if mask_id is None:
        raise ValueError("SamplerConfig.mask_token_id is not set: take it from the model checkpoint's "
                         "conventions (editmgt_jax.checkpoints.read_conventions(CKPT).mask_token_id; "
                         "Editor.sampler_config() does)")
    # shapes the loop needs before it runs (record sizes): traced abstractly, never computed
    n_codes = n_scores = None
    if record and (cfg.captures or record_logits):
        lg_shape, sc_shape = jax.eval_shape(lambda r: call_model(r, 0), ref_ids)
        n_codes = int(lg_shape.shape[-1])
        n_scores = None if sc_shape is None else int(sc_shape.shape[-1])

    if inpaint_mask is None:
        tokens0 = jnp.full((bsz, h, w), mask_id, jnp.int32)
        start_ratio = jnp.ones((bsz,), jnp.float32)
    else:
        inpaint_mask = jnp.asarray(inpaint_mask, bool).reshape(bsz, h, w)
        tokens0 = jnp.where(inpaint_mask, jnp.int32(mask_id), ref_ids)
        start_ratio = jnp.sum(inpaint_mask, axis=(1, 2)).astype(jnp.float32) / jnp.float32(n)

    keys = None
    if not cfg.greedy:
        if key is None:
            raise ValueError("sampling needs a PRNG key (or SamplerConfig(greedy=True))")
        keys = per_sample_keys(key, bsz)

    records = None
    if record:
        spec = dict(tokens_before=((h, w), jnp.int32), tokens_after=((h, w), jnp.int32),
                    pred_x0=((h, w), jnp.int32), hold=((n,), bool), remask=((n,), bool),
                    selected_probs=((n,), jnp.float32), mask_len=((), jnp.int32), cutoff=((), jnp.float32))
        if cfg.captures:
            if n_scores is None:
                raise ValueError("consolidation_blocks are set but the model returned no scores")
            nb = len(cfg.consolidation_blocks)
            spec.update(score_blocks=((nb, n_scores), jnp.float32), score_raw=((n_scores,), jnp.float32),
                        score_rescaled=((n_scores,), jnp.float32), score_smoothed=((n_scores,), jnp.float32),
                        score_upsampled=((n,), jnp.float32))
        if record_logits:
            spec["logits"] = ((h, w, n_codes), jnp.float32)
        records = {k: jnp.zeros((cfg.steps, bsz) + shape, dt) for k, (shape, dt) in spec.items()}

    def body(i, state: SamplerState) -> SamplerState:
        logits, scores = call_model(state.tokens, i, mask_id)
        logits = logits.astype(jnp.float32)
        if cfg.uses_cfg:
            uncond, cond = logits[:bsz], logits[bsz:]
            logits = uncond + jnp.float32(cfg.guidance_scale) * (cond - uncond)
        cons = None
        if cfg.captures:
            if scores is None:
                raise ValueError("consolidation_blocks are set but the model returned no scores")
            scores = scores.astype(jnp.float32)
            scores = scores[bsz:] if cfg.uses_cfg else scores  # the conditional half only
            cons = consolidate(scores, _score_grid(cfg, scores.shape[-1], (h, w)), (h, w))
        step_keys = None
        if state.keys is not None:
            step_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(state.keys)
        tokens, info = step_update(state.tokens, ref_ids, logits, cons["upsampled"] if cfg.holds else None,
                                   i, cfg, mask_id=mask_id, start_ratio=start_ratio, keys=step_keys)
        recs = state.records
        if recs is not None:
            now = dict(info, tokens_before=state.tokens, tokens_after=tokens)
            if cons is not None:
                now.update(score_blocks=scores, score_raw=cons["raw"], score_rescaled=cons["rescaled"],
                           score_smoothed=cons["smoothed"], score_upsampled=cons["upsampled"])
            if record_logits:
                now["logits"] = logits
            recs = {k: v.at[i].set(now[k].astype(v.dtype)) for k, v in recs.items()}
        heat = state.heat if cons is None else state.heat + cons["smoothed"]
        return state.replace(tokens=tokens, records=recs, heat=heat)

    heat0 = None
    if cfg.captures:
        n_heat = n_scores if n_scores is not None else int(np.prod(_score_grid(cfg, _n_scores(call_model, ref_ids),
                                                                              (h, w))))
        heat0 = jnp.zeros((bsz, n_heat), jnp.float32)
    state = jax.lax.fori_loop(0, cfg.steps, body,
                              SamplerState(tokens=tokens0, keys=keys, records=records, heat=heat0))
    out = {"tokens": state.tokens}
    if cfg.captures:
        grid = _score_grid(cfg, state.heat.shape[-1], (h, w))
        # The edit-region map: the smoothed consolidated score averaged over the steps.
        out["heatmap"] = (state.heat / jnp.float32(cfg.steps)).reshape((bsz,) + tuple(grid))
    if record:
        squeeze = bsz == 1
        out.update({k: (v[:, 0] if squeeze else v) for k, v in state.records.items()})
    return out
