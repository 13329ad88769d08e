"""Training losses: masked-token cross-entropy for the editor, reconstruction + VQ terms for the
tokenizer. Pure functions of arrays; randomness comes from explicit keys.

Timestep convention (``TRAINING_TIMESTEP_CONVENTIONS``)
-------------------------------------------------------
The transformer multiplies its ``timestep`` argument by 1000 before the sinusoidal embedding. The
release trains with ``timestep = 1000 * mask_ratio`` (so the embedding sees ``1e6 * ratio``) but
samples with the integer step index ``N-1 ... 0``: the two never agree.

* ``"mask_fraction"`` (default for new training): ``timestep`` = the fraction of target tokens
  that are masked in the input, in ``[0, 1]``. At inference the sampler feeds the fraction of
  still-unknown tokens of the current step (1.0 at the first step), which the input itself
  determines, so training and sampling see the same quantity.
* ``"release"``: ``timestep = 1000 * mask_ratio`` (continuous cosine ratio), exactly what the
  released weights were trained with; use it to fine-tune converted official weights faithfully.

The convention is stored with every checkpoint (``editor.timestep_convention``) so inference can
match it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from editmgt_jax.models.embeddings import DEFAULT_AESTHETIC

TRAINING_TIMESTEP_CONVENTIONS = ("mask_fraction", "release")


def sampler_timestep_convention(training_convention: str) -> str:
    """What inference feeds as the timestep (``SamplerSettings.timestep_convention``, one of
    ``sampling.config.TIMESTEP_CONVENTIONS``) for a model trained with ``training_convention``:
    the release's weights want the step index, as the converter writes."""
    return "mask_fraction" if training_convention == "mask_fraction" else "step_index"


# ---------------------------------------------------------------------------------------------
# Editor


def cosine_mask_ratio(t: jax.Array) -> jax.Array:
    """Mask ratio ``cos(pi/2 * t)`` for ``t`` in [0, 1] (t=0: everything masked)."""
    return jnp.cos(0.5 * math.pi * t)


def example_keys(key: jax.Array, example_ids: jax.Array) -> jax.Array:
    """One key per example, ``fold_in(key, id)``: the draws for an example depend only on its id,
    not on its position in the batch, so any sharding or host split of the batch gives the same
    masks."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(example_ids.astype(jnp.uint32))


def mask_target_tokens(keys: jax.Array, target_ids: jax.Array, mask_id: int, full_mask_prob: float = 0.0):
    """Mask a cosine-scheduled fraction of each example's target tokens.

    keys [B] PRNG keys (``example_keys``); target_ids [B, H, W] int32.
    Per example: ``t ~ U(0, 1)``, ratio ``cos(pi/2 t)``, ``n = clip(round(ratio * H * W), 1, H*W)``
    positions chosen uniformly without replacement are set to ``mask_id``. With probability
    ``full_mask_prob`` (its own draw, ``fold_in(key, 2)``, so the other draws stay as they are) an
    example is masked entirely instead: the sampler's first step, where only the source and the
    instruction say what the target is.

    Returns (masked_ids [B, H, W] int32, mask [B, H, W] bool, ratio [B] f32 (continuous),
    fraction [B] f32 (= n / (H*W), the fraction actually masked)).
    """
    b, h, w = target_ids.shape
    n_tok = h * w

    def one(key):
        kt, kp = jax.random.split(key)
        ratio = cosine_mask_ratio(jax.random.uniform(kt, (), jnp.float32))
        if full_mask_prob > 0:
            full = jax.random.bernoulli(jax.random.fold_in(key, 2), full_mask_prob)
            ratio = jnp.where(full, jnp.float32(1.0), ratio)
        n = jnp.clip(jnp.round(ratio * n_tok), 1, n_tok).astype(jnp.int32)
        scores = jax.random.uniform(kp, (n_tok,), jnp.float32)
        rank = jnp.argsort(jnp.argsort(scores))
        return rank < n, ratio, n.astype(jnp.float32) / n_tok

    mask, ratio, fraction = jax.vmap(one)(keys)
    mask = mask.reshape(b, h, w)
    masked = jnp.where(mask, jnp.int32(mask_id), target_ids.astype(jnp.int32))
    return masked, mask, ratio, fraction


def training_timestep(ratio: jax.Array, fraction: jax.Array, convention: str) -> jax.Array:
    """The ``timestep`` fed to the transformer for a training example (see module docstring)."""
    if convention == "mask_fraction":
        return fraction
    if convention == "release":
        return ratio * 1000.0
    raise ValueError(f"timestep_convention={convention!r}: use one of {TRAINING_TIMESTEP_CONVENTIONS}")


def condition_dropout(key: jax.Array, p: float, cond: tuple[jax.Array, jax.Array],
                      uncond: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Replace each example's text conditioning by the unconditional one with probability ``p``
    (classifier-free guidance training).

    key: one key per example [B]; cond = (text_states [B, L, D], pooled [B, P]);
    uncond = (text_states [1 or B, L, D], pooled [1 or B, P]).
    Returns (text_states, pooled, dropped [B] bool).
    """
    states, pooled = cond
    drop = jax.vmap(lambda k: jax.random.bernoulli(k, p))(key)
    u_states = jnp.broadcast_to(uncond[0], states.shape).astype(states.dtype)
    u_pooled = jnp.broadcast_to(uncond[1], pooled.shape).astype(pooled.dtype)
    states = jnp.where(drop[:, None, None], u_states, states)
    pooled = jnp.where(drop[:, None], u_pooled, pooled)
    return states, pooled, drop


def masked_token_cross_entropy(logits: jax.Array, target_ids: jax.Array, mask: jax.Array,
                               weights: jax.Array | None = None):
    """Mean cross-entropy over masked target positions only, optionally weighted per position.

    logits [B, H, W, C] (any float dtype; computed in f32); target_ids [B, H, W] int32 in [0, C);
    mask [B, H, W] bool; weights [B, H, W] (default all 1): the loss is
    ``sum(ce * mask * weights) / sum(mask * weights)``. Returns (loss [] f32, accuracy on masked
    positions [] f32, unweighted).
    """
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, target_ids)
    m = mask.astype(jnp.float32)
    w = m if weights is None else m * weights.astype(jnp.float32)
    loss = jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1e-6)
    acc = jnp.sum((jnp.argmax(logits, -1) == target_ids) * m) / jnp.maximum(jnp.sum(m), 1.0)
    return loss, acc


def changed_token_weights(source_ids: jax.Array, target_ids: jax.Array, changed_weight: float) -> jax.Array:
    """Per-position loss weights: ``changed_weight`` where the edit changes the token
    (``target != source``), 1 elsewhere. The unchanged positions are the copy the model learns at
    once; the changed ones carry the instruction, and are a few percent of the grid for most edits."""
    changed = source_ids != target_ids
    return jnp.where(changed, jnp.float32(changed_weight), jnp.float32(1.0))


def balanced_changed_cross_entropy(logits: jax.Array, source_ids: jax.Array, target_ids: jax.Array,
                                   mask: jax.Array, changed_share: float) -> jax.Array:
    """Masked-token cross-entropy where every example counts the same and, within an example, the
    positions the edit changes carry ``changed_share`` of its loss.

    Per example: ``changed_share * mean(ce over masked changed positions) + (1 - changed_share) *
    mean(ce over masked unchanged positions)`` (all of it on the one set that is present when the
    other is empty; examples with nothing masked count 0); the loss is the mean over examples with
    masked positions. With ``batch``-wide normalisation (``masked_token_cross_entropy``) an edit that
    changes the whole grid (a new background, a style) outweighs one that changes a shape's few
    cells many times over, however the changed positions are weighted; here the few cells of a
    recoloured shape weigh as much as a whole new background.
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), target_ids)
    m = mask.astype(jnp.float32)
    changed = (source_ids != target_ids).astype(jnp.float32) * m
    same = m - changed
    axes = tuple(range(1, ce.ndim))
    n_ch, n_same = jnp.sum(changed, axes), jnp.sum(same, axes)
    ce_ch = jnp.sum(ce * changed, axes) / jnp.maximum(n_ch, 1.0)
    ce_same = jnp.sum(ce * same, axes) / jnp.maximum(n_same, 1.0)
    share = jnp.where(n_same == 0, 1.0, jnp.where(n_ch == 0, 0.0, jnp.float32(changed_share)))
    per_example = share * ce_ch + (1.0 - share) * ce_same
    present = (n_ch + n_same > 0).astype(jnp.float32)
    return jnp.sum(per_example * present) / jnp.maximum(jnp.sum(present), 1.0)


def region_attention_loss(scores: jax.Array, source_ids: jax.Array, target_ids: jax.Array,
                          weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Pull the consolidated text-to-image attention towards the cells the edit changes.

    ``scores`` ``[B, n_blocks, N]``: the captured attention of the blocks the sampler consolidates
    (``capture_grad=True``), mean over heads and text rows, on the transformer's ``h x w`` grid;
    ``source_ids`` / ``target_ids`` ``[B, H, W]``. The sampler's first reduction is the mean over
    blocks; here that mean, normalised over the image cells, is a distribution ``p``, and the
    changed-token mask (target id != source id; max-pooled to the score grid when the transformer
    down-samples) normalised the same way is ``q``. Per example the loss is ``KL(q || p)`` (0 when
    the attention is spread evenly over exactly the changed cells); examples where nothing changed,
    or with ``weights`` 0 (e.g. the instruction dropped for guidance training), count 0.

    Returns ``(loss [] f32, mass [] f32)``: the mean KL over the counted examples, and the mean share
    of the attention ``p`` that falls on changed cells (1 = all of it).
    """
    a = jnp.mean(scores.astype(jnp.float32), axis=1)                       # [B, N]
    b, n = a.shape
    changed = (source_ids != target_ids)
    h, w = changed.shape[1:]
    if n != h * w:                                                         # down-sampled grid
        f = int(round(math.sqrt(h * w / n)))
        changed = changed.reshape(b, h // f, f, w // f, f).any(axis=(2, 4))
    q = changed.reshape(b, -1).astype(jnp.float32)
    count = jnp.sum(q, axis=1)
    q = q / jnp.maximum(count, 1.0)[:, None]
    p = a / jnp.maximum(jnp.sum(a, axis=1, keepdims=True), 1e-12)
    kl = jnp.sum(jnp.where(q > 0, q * (jnp.log(jnp.maximum(q, 1e-12)) - jnp.log(jnp.maximum(p, 1e-12))), 0.0),
                 axis=1)
    mass = jnp.sum(p * (q > 0), axis=1)
    use = (count > 0).astype(jnp.float32)
    if weights is not None:
        use = use * weights.astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(use), 1.0)
    return jnp.sum(kl * use) / denom, jnp.sum(mass * use) / denom


def changed_token_hits(logits: jax.Array, source_ids: jax.Array, target_ids: jax.Array,
                       mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(hits, count) f32 scalars over masked positions whose target id differs from the source's:
    how many the argmax predicts (``editmgt_jax.evaluation.metrics.changed_token_accuracy`` on the
    positions the step masked)."""
    changed = (source_ids != target_ids) & mask
    hits = (jnp.argmax(logits, -1) == target_ids) & changed
    return jnp.sum(hits.astype(jnp.float32)), jnp.sum(changed.astype(jnp.float32))


def default_micro_conds(batch_size: int, height: int, width: int, aesthetic: float = DEFAULT_AESTHETIC) -> jax.Array:
    """[B, 5] f32 ``[width, height, crop_top, crop_left, aesthetic]`` for uncropped images."""
    row = jnp.asarray([width, height, 0.0, 0.0, aesthetic], jnp.float32)
    return jnp.broadcast_to(row, (batch_size, 5))


# ---------------------------------------------------------------------------------------------
# VQ tokenizer


def vq_loss(pixels: jax.Array, reconstruction: jax.Array, aux: Mapping[str, jax.Array], *,
            l1_weight: float = 1.0, l2_weight: float = 0.0, codebook_weight: float = 1.0,
            commitment_weight: float = 0.25) -> tuple[jax.Array, dict]:
    """Reconstruction (L1 and/or L2) + codebook + commitment terms.

    pixels, reconstruction [B, H, W, 3] in [0, 1]; ``aux`` from ``VQModel.__call__`` with the
    unweighted ``codebook`` (||sg(z) - e||^2) and ``commitment`` (||z - sg(e)||^2) terms.
    Returns (loss [] f32, dict of the weighted terms and the raw reconstruction errors).
    """
    x = pixels.astype(jnp.float32)
    y = reconstruction.astype(jnp.float32)
    l1 = jnp.mean(jnp.abs(y - x))
    l2 = jnp.mean(jnp.square(y - x))
    missing = {"codebook", "commitment"} - set(aux)
    if missing:
        raise KeyError(f"vq_loss: the VQ model's aux output lacks {sorted(missing)} "
                       f"(has {sorted(aux)})")
    codebook = jnp.asarray(aux["codebook"], jnp.float32)
    commitment = jnp.asarray(aux["commitment"], jnp.float32)
    loss = l1_weight * l1 + l2_weight * l2 + codebook_weight * codebook + commitment_weight * commitment
    return loss, {"l1": l1, "l2": l2, "codebook": codebook, "commitment": commitment}
