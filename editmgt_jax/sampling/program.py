"""The edit program: VQ encode -> text-conditioned region-hold sampling loop -> VQ decode.

One pure function of the merged modules, the static sampler config, the traced knobs and the
inputs. Every caller that edits goes through it: ``Editor.edit`` (and through the Editor the
trainer's held-out evaluation, its preview grids and ``infer.evaluate``) and the benchmarks. The
rules an edit needs beyond the loop live here once:

* leftover mask ids and ids outside the codebook decode as code 0 (the official pipeline's decode;
  the loop leaves no mask id when anything was masked, and the logits head never proposes an id
  outside the codebook, so this only matters for a zero-step or fully held edit of a foreign model);
* the mask id comes from the sampler config, i.e. from the checkpoint's conventions record;
* pixels enter as ``uint8`` and leave as ``uint8`` (rounded, clipped), so every caller sees the
  same bytes.

The empty prompt (the negative prompt's encoding under guidance) is the text side's business:
``Editor`` encodes ``negative_prompt`` with the model's own text encoder and passes it in.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from editmgt_jax.sampling.config import Knobs, SamplerConfig
from editmgt_jax.sampling.region_hold import sample


def to_pixels(images: jax.Array) -> jax.Array:
    """``uint8`` images ``[B, H, W, 3]`` -> float32 in [0, 1] (floats are taken as [0, 1] already)."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def to_uint8(pixels: jax.Array) -> jax.Array:
    """float pixels in [0, 1] -> ``uint8`` (clipped, rounded)."""
    return jnp.round(jnp.clip(pixels.astype(jnp.float32), 0.0, 1.0) * 255.0).astype(jnp.uint8)


def decodable(tokens: jax.Array, mask_id: int, codebook_size: int) -> jax.Array:
    """The one rule for ids the tokenizer cannot decode: leftover mask ids and ids outside the
    codebook become code 0, as the official pipeline decodes them."""
    return jnp.where((tokens >= codebook_size) | (tokens == mask_id), 0, tokens)


def encode(vq, images: jax.Array) -> jax.Array:
    """``[B, H, W, 3]`` uint8 (or [0, 1] float) -> ``[B, h, w] int32`` token ids."""
    return vq.encode_ids(to_pixels(images))


def decode(vq, tokens: jax.Array, mask_id: int) -> jax.Array:
    """Token ids -> ``[B, H, W, 3] uint8`` pixels (undecodable ids by :func:`decodable`)."""
    return to_uint8(vq.decode_ids(decodable(tokens, mask_id, vq.cfg.num_vq_embeddings)))


def edit(vq, transformer, cfg: SamplerConfig, knobs: Knobs, key, images, text_states, pooled,
         neg_text_states=None, neg_pooled=None, micro_conds=None, inpaint_mask=None, capture_rows=None, *,
         on_step: Callable | None = None) -> dict[str, jax.Array]:
    """Edit a batch of images: callable inside ``jax.jit`` with the modules merged there.

    Args:
      vq: the VQ tokenizer module; transformer: the EditMGT transformer module (its call is the
        model contract of ``sampling.guidance``).
      cfg, knobs: ``SamplerSettings(...).split()``; ``cfg.model.mask_token_id`` is the mask id.
      key: one PRNG key or ``[B]`` keys (raw ``uint32`` or typed); unused when greedy.
      images: ``[B, H, W, 3]`` uint8 sources at the working size.
      text_states, pooled / neg_text_states, neg_pooled: the instruction's and the negative prompt's
        encodings (batch 1 broadcasts; the negative ones are needed under guidance).
      micro_conds: ``[B, 5]`` (default: the config's); inpaint_mask: ``[B, h, w]`` bool, True = may change.
      capture_rows: ``[B, L]`` weights of the instruction's text rows in the edit-region map (``None``:
        every row, as the reference).
      on_step: a host function called with the step index as each step begins (a progress bar); the
        numbers are the same with or without it.

    Returns:
      ``image`` ``[B, H, W, 3] uint8`` (the decoded edit), ``tokens`` ``[B, h, w] int32`` (final ids),
      ``ref_ids`` (the sources' ids) and, with consolidation, ``heatmap`` ``[B, gh, gw] float32``.
    """
    ref_ids = encode(vq, images)
    model_fn = transformer
    if on_step is not None:
        def model_fn(ids, *args, **kwargs):   # one host call per step, as the step begins
            jax.debug.callback(on_step, args[-1])
            return transformer(ids, *args, **kwargs)
    res = sample(model_fn, cfg, knobs, ref_ids, text_states, pooled, neg_text_states, neg_pooled, key=key,
                 micro_conds=micro_conds, inpaint_mask=inpaint_mask, capture_rows=capture_rows)
    out = {"image": decode(vq, res["tokens"], cfg.model.mask_token_id), "tokens": res["tokens"],
           "ref_ids": ref_ids}
    if res.get("heatmap") is not None:
        out["heatmap"] = res["heatmap"]
    return out


def roundtrip(vq, images: jax.Array) -> dict[str, jax.Array]:
    """The VQ side alone: ``ids`` of the images and the ``image`` they decode to (an edit that keeps
    every source token; the ceiling of how close an edit can stay to its source)."""
    ids = encode(vq, images)
    return {"ids": ids, "image": to_uint8(vq.decode_ids(ids))}
