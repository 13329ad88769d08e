"""Transformer blocks of EditMGT: joint attention with a reference stream, dual- and single-stream blocks.

The joint sequence of one attention call is ``[text, image, reference]`` (the reference segment is
absent when no reference tokens are given). The reference stream shares every weight of the image
stream (AdaLN linear, q/k/v, QK norms, output projection, MLP) and differs only in its modulation,
which comes from its own conditioning vector ``ref_temb``. The blocks therefore carry image and
reference tokens as one sequence, so each shared projection is one matrix product, and apply the
modulation per segment.

Attention tensors use the layout ``[B, heads, S, head_dim]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from editmgt_jax.models.attention import Segments, attention, naive_attention, naive_capture
from editmgt_jax.models.embeddings import apply_rope
from editmgt_jax.models.layers import Linear, RMSNorm, gelu_tanh, layer_norm

QK_NORM_EPS = 1e-6


# ----------------------------------------------------------------------------- attention core
def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          bias: jax.Array | None = None) -> jax.Array:
    """Softmax attention with full ``[B, H, Sq, Sk]`` float32 logits (the textbook formula; the model
    uses :func:`editmgt_jax.models.attention.attention`)."""
    return naive_attention(q, k, v, bias)


def text_to_image_attention(q: jax.Array, k: jax.Array, seg: Segments, bias: jax.Array | None,
                            mode: str) -> jax.Array:
    """Attention of the text queries over the image keys from full logits, ``[B, seg.image] float32``
    (the textbook formula of what :func:`~editmgt_jax.models.attention.attention` captures).

    ``mode="official"``: softmax over the ``[text, image]`` keys only, without the reference bias (what
    the reference implementation records). ``mode="model"``: the rows of the attention actually
    used (all keys, bias included), restricted to the image columns.
    """
    return naive_capture(q, k, seg, bias, mode)


def joint_attention(q: jax.Array, k: jax.Array, v: jax.Array, cos: jax.Array, sin: jax.Array,
                    seg: Segments, log_strength: jax.Array | None,
                    capture_mode: str | None,
                    implementation: str | None = None, capture_grad: bool = False,
                    capture_rows: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
    """RoPE + attention over the joint sequence.

    Args:
      q, k, v: ``[B, H, S, D]`` with ``S = seg.total``, q and k already QK-normalised.
      cos, sin: ``[S, D] float32`` rotary tables of the joint sequence.
      log_strength: ``log`` of the reference strength (float32 scalar), or ``None`` for no bias.
      capture_mode: ``None`` or one of :data:`CAPTURE_MODES`.
      implementation: attention implementation (:data:`~editmgt_jax.models.attention.IMPLEMENTATIONS`),
        ``None`` for the backend's default.
      capture_grad: the captured score is differentiable (``attention.text_rows_scores``).
      capture_rows: ``[B, L]`` weights of the text rows in the captured score, or ``None`` (all).
    Returns:
      ``(out [B, S, H*D], score [B, seg.image] float32 or None)``.
    """
    with jax.named_scope("rope"):
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
    with jax.named_scope("attention_core"):   # profiles attribute the core's ops by this name
        out, score = attention(q, k, v, seg, log_strength, capture_mode=capture_mode,
                               implementation=implementation, capture_grad=capture_grad,
                               capture_rows=capture_rows)
    b, h, s, d = out.shape
    return out.transpose(0, 2, 1, 3).reshape(b, s, h * d), score


# ----------------------------------------------------------------------------- modules
class Attention(nnx.Module):
    """q/k/v projections with per-head QK RMSNorm (diffusers ``Attention`` with ``qk_norm="rms_norm"``).

    ``context=True`` adds the text-stream projections of the dual-stream block (``add_*_proj``,
    ``norm_added_*``, ``to_add_out``); ``pre_only=True`` (single-stream block) has no ``to_out``.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, *, context: bool, pre_only: bool,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim

        def proj(i, o, axes):
            return Linear(i, o, axes=axes, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

        def qk_norm():
            return RMSNorm(head_dim, eps=QK_NORM_EPS, param_dtype=param_dtype)

        self.to_q = proj(dim, inner, ("embed", "heads"))
        self.to_k = proj(dim, inner, ("embed", "heads"))
        self.to_v = proj(dim, inner, ("embed", "heads"))
        self.norm_q = qk_norm()
        self.norm_k = qk_norm()
        self.to_out = None if pre_only else proj(inner, dim, ("heads", "embed"))
        if context:
            self.add_q_proj = proj(dim, inner, ("embed", "heads"))
            self.add_k_proj = proj(dim, inner, ("embed", "heads"))
            self.add_v_proj = proj(dim, inner, ("embed", "heads"))
            self.norm_added_q = qk_norm()
            self.norm_added_k = qk_norm()
            self.to_add_out = proj(inner, dim, ("heads", "embed"))

    def _heads(self, x: jax.Array) -> jax.Array:
        b, s, _ = x.shape
        return x.reshape(b, s, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Image-stream (and single-stream) projections: ``[B, S, dim] -> 3 x [B, H, S, head_dim]``."""
        return (self.norm_q(self._heads(self.to_q(x))), self.norm_k(self._heads(self.to_k(x))),
                self._heads(self.to_v(x)))

    def context_qkv(self, c: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Text-stream projections of the dual-stream block: ``[B, L, dim] -> 3 x [B, H, L, head_dim]``."""
        return (self.norm_added_q(self._heads(self.add_q_proj(c))),
                self.norm_added_k(self._heads(self.add_k_proj(c))),
                self._heads(self.add_v_proj(c)))


class AdaLayerNormZero(nnx.Module):
    """AdaLN-Zero modulation: ``linear(SiLU(temb))`` split into ``chunks`` vectors of width ``dim``.

    ``temb [B, dim] -> chunks x [B, dim]``; the (parameter-free) LayerNorm is applied by the block.
    """

    def __init__(self, dim: int, chunks: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.chunks = chunks
        self.linear = Linear(dim, chunks * dim, axes=("embed", "mlp"), rngs=rngs, dtype=dtype,
                             param_dtype=param_dtype)

    def __call__(self, temb: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(jnp.split(self.linear(jax.nn.silu(temb)), self.chunks, axis=-1))

    def per_token(self, temb: jax.Array, ref_temb: jax.Array | None, length: int,
                  ref_length: int) -> tuple[jax.Array, ...]:
        """Modulation vectors for a sequence of ``length`` tokens conditioned on ``temb`` followed by
        ``ref_length`` reference tokens conditioned on ``ref_temb``.

        Returns ``chunks`` arrays ``[B, length + ref_length, dim]`` (``[B, 1, dim]`` without reference).
        """
        mods = self(temb)
        if not ref_length:
            return tuple(m[:, None] for m in mods)
        ref_mods = self(ref_temb)
        b, d = mods[0].shape
        return tuple(jnp.concatenate([jnp.broadcast_to(m[:, None], (b, length, d)),
                                      jnp.broadcast_to(r[:, None], (b, ref_length, d))], axis=1)
                     for m, r in zip(mods, ref_mods))


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """``LayerNorm(x) * (1 + scale) + shift`` with ``x [B, S, D]`` and ``shift, scale [B, S or 1, D]``."""
    return layer_norm(x) * (1 + scale) + shift


class FeedForward(nnx.Module):
    """``proj_out(gelu_tanh(proj_in(x)))``, hidden width ``mult * dim``.

    Official names: ``ff.net.0.proj`` (``proj_in``) and ``ff.net.2`` (``proj_out``).
    """

    def __init__(self, dim: int, *, mult: int = 4, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.proj_in = Linear(dim, mult * dim, axes=("embed", "mlp"), rngs=rngs, dtype=dtype,
                              param_dtype=param_dtype)
        self.proj_out = Linear(mult * dim, dim, axes=("mlp", "embed"), rngs=rngs, dtype=dtype,
                               param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj_out(gelu_tanh(self.proj_in(x)))


def _residual_mlp(x: jax.Array, attn_out: jax.Array, mod: tuple[jax.Array, ...],
                  ff: FeedForward) -> jax.Array:
    """``x + gate_msa * attn_out``, then ``+ gate_mlp * ff(modulate(.))`` (dual-stream block tail)."""
    _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
    x = x + gate_msa * attn_out
    return x + gate_mlp * ff(modulate(x, shift_mlp, scale_mlp))


class DualStreamBlock(nnx.Module):
    """MM-DiT block: separate text and image weights, one joint attention (official ``TransformerBlock``).

    The reference stream runs through the image weights with modulation from ``ref_temb``.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, *, mlp_ratio: int = 4, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = AdaLayerNormZero(dim, 6, **kw)
        self.norm1_context = AdaLayerNormZero(dim, 6, **kw)
        self.attn = Attention(dim, num_heads, head_dim, context=True, pre_only=False, **kw)
        self.ff = FeedForward(dim, mult=mlp_ratio, **kw)
        self.ff_context = FeedForward(dim, mult=mlp_ratio, **kw)

    def __call__(self, txt: jax.Array, img: jax.Array, temb: jax.Array, ref_temb: jax.Array | None,
                 cos: jax.Array, sin: jax.Array, *, seg: Segments, log_strength: jax.Array | None = None,
                 capture_mode: str | None = None, attention_impl: str | None = None,
                 capture_grad: bool = False, capture_rows: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """One block.

        Args:
          txt: ``[B, L, D]`` text stream.
          img: ``[B, N + Nr, D]`` image tokens followed by the ``Nr`` reference tokens (``seg``).
          temb, ref_temb: ``[B, D]`` conditioning of the target / reference stream.
          cos, sin: ``[L + N + Nr, head_dim] float32`` rotary tables of the joint sequence.
          log_strength: ``log`` of the reference strength, or ``None`` (no bias).
          attention_impl: attention implementation, ``None`` for the backend's default.
        Returns:
          ``(txt, img, score)``; ``score`` is ``[B, N] float32`` when ``capture_mode`` is set.
        """
        mod_img = self.norm1.per_token(temb, ref_temb, seg.image, seg.reference)
        mod_txt = tuple(m[:, None] for m in self.norm1_context(temb))
        qt, kt, vt = self.attn.context_qkv(modulate(txt, *mod_txt[:2]))
        qi, ki, vi = self.attn.qkv(modulate(img, *mod_img[:2]))
        q, k, v = (jnp.concatenate(p, axis=2) for p in ((qt, qi), (kt, ki), (vt, vi)))
        out, score = joint_attention(q, k, v, cos, sin, seg, log_strength, capture_mode, attention_impl,
                                     capture_grad, capture_rows)
        img = _residual_mlp(img, self.attn.to_out(out[:, seg.text:]), mod_img, self.ff)
        txt = _residual_mlp(txt, self.attn.to_add_out(out[:, : seg.text]), mod_txt, self.ff_context)
        return txt, img, score


class SingleStreamBlock(nnx.Module):
    """Single-stream block on ``[text, image]``: parallel attention and MLP, one output projection.

    The reference stream runs alongside with the same weights and modulation from ``ref_temb``.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, *, mlp_ratio: int = 4, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        hidden = mlp_ratio * dim
        self.norm = AdaLayerNormZero(dim, 3, **kw)
        self.proj_mlp = Linear(dim, hidden, axes=("embed", "mlp"), **kw)
        self.proj_out = Linear(num_heads * head_dim + hidden, dim, axes=("mlp", "embed"), **kw)
        self.attn = Attention(dim, num_heads, head_dim, context=False, pre_only=True, **kw)

    def __call__(self, x: jax.Array, temb: jax.Array, ref_temb: jax.Array | None, cos: jax.Array,
                 sin: jax.Array, *, seg: Segments, log_strength: jax.Array | None = None,
                 capture_mode: str | None = None, attention_impl: str | None = None,
                 capture_grad: bool = False, capture_rows: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array | None]:
        """One block.

        Args:
          x: ``[B, L + N + Nr, D]``: text, image, then reference tokens (``seg``).
          temb, ref_temb: ``[B, D]``. cos, sin: ``[L + N + Nr, head_dim] float32``.
          log_strength: ``log`` of the reference strength, or ``None`` (no bias).
          attention_impl: attention implementation, ``None`` for the backend's default.
        Returns:
          ``(x, score)``; ``score`` is ``[B, N] float32`` when ``capture_mode`` is set.
        """
        shift, scale, gate = self.norm.per_token(temb, ref_temb, seg.text + seg.image, seg.reference)
        h = modulate(x, shift, scale)
        out, score = joint_attention(*self.attn.qkv(h), cos, sin, seg, log_strength, capture_mode,
                                     attention_impl, capture_grad, capture_rows)
        mlp = gelu_tanh(self.proj_mlp(h))
        return x + gate * self.proj_out(jnp.concatenate([out, mlp], axis=-1)), score
