"""The guided model: the transformer as the decode loop sees it.

Classifier-free guidance runs the model once on the batch ``[uncond, cond]`` (the negative prompt's
encodings first) and combines ``uncond + g * (cond - uncond)``; the captured attention scores are
the conditional half's. The timestep follows the model's convention, and the reference strength
(a traced knob) goes into the model call. The model function's contract::

    model_fn(ids, ref_ids, text_states, pooled, micro_conds, timestep, *,
             reference_strength, capture_blocks, capture_mode)
        -> (logits [N, H, W, K], scores [N, len(capture_blocks), h*w] or None)

``ids`` / ``ref_ids`` are ``[N, H, W] int32`` (the mask id where unknown); ``timestep`` is ``[N]``:
``steps - 1 - step`` as int32 (``"step_index"``) or each image's masked fraction as float32
(``"mask_fraction"``). ``scores`` are the text-to-image attention of the ``capture_blocks`` (global
block indices), averaged over heads and text rows, on the transformer's ``h x w`` grid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from editmgt_jax.sampling.config import Knobs, SamplerConfig


def batch_to(x, bsz: int, what: str) -> jax.Array:
    """``x`` with batch ``bsz``: as is, or broadcast from batch 1; else ``ValueError`` naming ``what``."""
    x = jnp.asarray(x)
    if x.shape[0] == bsz:
        return x
    if x.shape[0] == 1:
        return jnp.broadcast_to(x, (bsz,) + x.shape[1:])
    raise ValueError(f"{what}: batch {x.shape[0]} does not match {bsz}")


@dataclasses.dataclass(frozen=True)
class GuidedModel:
    """``model_fn`` bound to the model-side inputs of one batch of edits (built by :meth:`bind`).

    ``text_states``, ``pooled``, ``micro_conds`` and ``ref_ids`` are the model batch: ``[uncond; cond]``
    (``2B``) when ``cfg.guided``, else the ``B`` conditional rows.
    """

    model_fn: Callable[..., Any]
    cfg: SamplerConfig
    batch: int
    ref_ids: jax.Array
    text_states: jax.Array
    pooled: jax.Array
    micro_conds: jax.Array
    capture_rows: jax.Array | None = None

    @classmethod
    def bind(cls, model_fn, cfg: SamplerConfig, ref_ids, text_states, pooled, neg_text_states=None,
             neg_pooled=None, micro_conds=None, capture_rows=None) -> "GuidedModel":
        """Broadcast batch-1 inputs to ``ref_ids``' batch and stack ``[uncond; cond]`` for guidance.

        ``micro_conds``: ``[B, 5]``, ``[1, 5]`` or ``[5]``; default ``cfg.model.micro_conds``.
        ``capture_rows``: ``[B, L]`` weights of the instruction's text rows in the captured scores
        (``None``: every row); the negative prompt's rows (whose scores are not used) weigh 1.
        """
        bsz = ref_ids.shape[0]
        if capture_rows is not None and cfg.captures:
            capture_rows = batch_to(jnp.asarray(capture_rows, jnp.float32), bsz, "capture_rows")
            if cfg.guided:
                capture_rows = jnp.concatenate([jnp.ones_like(capture_rows), capture_rows], axis=0)
            base = cls.bind(model_fn, cfg, ref_ids, text_states, pooled, neg_text_states, neg_pooled, micro_conds)
            return dataclasses.replace(base, capture_rows=capture_rows)
        bsz = ref_ids.shape[0]
        text_states = batch_to(text_states, bsz, "text_states")
        pooled = batch_to(pooled, bsz, "pooled")
        if micro_conds is None:
            micro_conds = cfg.model.micro_conds
        micro_conds = jnp.asarray(micro_conds, jnp.float32)
        micro_conds = batch_to(micro_conds.reshape(-1, micro_conds.shape[-1]), bsz, "micro_conds")
        if not cfg.guided:
            return cls(model_fn, cfg, bsz, ref_ids, text_states, pooled, micro_conds)
        if neg_text_states is None or neg_pooled is None:
            raise ValueError("guidance_scale > 1 needs neg_text_states and neg_pooled")
        both = lambda neg, pos: jnp.concatenate([neg, pos], axis=0)  # noqa: E731
        return cls(model_fn, cfg, bsz, both(ref_ids, ref_ids),
                   both(batch_to(neg_text_states, bsz, "neg_text_states"), text_states),
                   both(batch_to(neg_pooled, bsz, "neg_pooled"), pooled), both(micro_conds, micro_conds))

    def timestep(self, ids: jax.Array, step) -> jax.Array:
        """``[N]`` timestep of the model batch ``ids`` at step ``step``, in the model's convention."""
        if self.cfg.model.timestep_convention == "mask_fraction":
            return jnp.mean(ids == self.cfg.model.mask_token_id, axis=(1, 2), dtype=jnp.float32)
        return jnp.full((ids.shape[0],), self.cfg.steps - 1 - step, jnp.int32)

    def raw(self, tokens: jax.Array, step, knobs: Knobs):
        """The model on the model batch of ``tokens [B, H, W]``: ``(logits, scores)`` as it returns them."""
        ids = jnp.concatenate([tokens, tokens], axis=0) if self.cfg.guided else tokens
        strength = knobs.reference_strength if self.cfg.reference_bias else 1.0
        rows = {} if self.capture_rows is None else {"capture_rows": self.capture_rows}
        return self.model_fn(ids, self.ref_ids, self.text_states, self.pooled, self.micro_conds,
                             self.timestep(ids, step), reference_strength=strength,
                             capture_blocks=self.cfg.consolidation_blocks, capture_mode=self.cfg.capture_mode,
                             **rows)

    def __call__(self, tokens: jax.Array, step, knobs: Knobs):
        """``(logits [B, H, W, K] float32`` guidance-combined, ``scores [B, n_blocks, h*w] float32`` of
        the conditional half, or ``None`` without captured blocks)."""
        logits, scores = self.raw(tokens, step, knobs)
        logits = logits.astype(jnp.float32)
        b = self.batch
        if self.cfg.guided:
            uncond, cond = logits[:b], logits[b:]
            logits = uncond + jnp.asarray(knobs.guidance_scale, jnp.float32) * (cond - uncond)
        if not self.cfg.captures:
            return logits, None
        if scores is None:
            raise ValueError("consolidation_blocks are set but the model returned no scores")
        scores = scores.astype(jnp.float32)
        return logits, scores[b:] if self.cfg.guided else scores

    def score_length(self, tokens: jax.Array, knobs: Knobs) -> int:
        """Length of the captured score vector, from an abstract trace of the model (no compute)."""
        _, scores = jax.eval_shape(lambda t, k: self.raw(t, 0, k), tokens, knobs)
        if scores is None:
            raise ValueError("consolidation_blocks are set but the model returned no scores")
        return int(scores.shape[-1])
