"""Gemma-2 decoder used as a text encoder (transformers ``Gemma2ForCausalLM``, hidden states only).

EditMGT conditions on ``hidden_states[-2]``: the output of the second-to-last decoder layer, before
the final norm, for 256 left-padded tokens with **no attention mask** (pads are attended like any
other token). What matters for parity with transformers:

- embeddings are multiplied by ``sqrt(hidden_size)`` cast to the activation dtype;
- RMSNorm is ``x * rsqrt(mean(x^2) + eps) * (1 + w)`` in float32;
- sandwich norms: ``h + post_attn_norm(attn(input_norm(h)))``, then the same around the MLP;
- attention: GQA, rotate-half RoPE at positions 0..L-1, queries scaled by
  ``query_pre_attn_scalar ** -0.5``, logits soft-capped ``c * tanh(logit / c)`` *before* masking,
  causal everywhere plus a sliding window (query i sees keys ``i - window < j <= i``) on the
  layers with an even index, softmax in float32;
- MLP ``down(gelu_tanh(gate(x)) * up(x))``.

Submodule names mirror the official keys (``model.layers[i].self_attn.q_proj``), so
``editmgt_jax.convert.gemma2`` is a plain table. The LM head is not built: no logits are needed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from editmgt_jax.models.layers import Linear, RMSNorm, checked_fields, partitioned

_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclasses.dataclass(frozen=True)
class Gemma2Config:
    """Hyper-parameters of Gemma-2 (transformers ``Gemma2Config`` names; defaults = Gemma-2-2B).

    ``layer_types`` gives each layer's attention (``"sliding_attention"`` / ``"full_attention"``);
    ``None`` means Gemma-2's alternation (sliding on even layer indices).
    ``num_layers_used``: decoder layers to build and load. ``None`` builds all of them and the final
    norm; ``num_hidden_layers - 1`` is all ``hidden_states[-2]`` needs (the last layer's and the final
    norm's official weights are then read past, not loaded).
    """

    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    sliding_window: int | None = 4096
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = 50.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    layer_types: tuple[str, ...] | None = None
    num_layers_used: int | None = None

    def __post_init__(self):
        if self.hidden_activation not in _ACTIVATIONS:
            raise ValueError(f"hidden_activation {self.hidden_activation!r} not supported; "
                             f"use one of {sorted(_ACTIVATIONS)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                                 f"{self.num_hidden_layers} layers")
            bad = sorted(set(self.layer_types) - {SLIDING, FULL})
            if bad:
                raise ValueError(f"layer_types: unknown attention type(s) {bad}")
        if self.num_layers_used is not None and self.num_layers_used not in (
                self.num_hidden_layers - 1, self.num_hidden_layers):
            raise ValueError(f"num_layers_used must be num_hidden_layers ({self.num_hidden_layers}) or one "
                             f"less (the penultimate hidden state), got {self.num_layers_used}")

    @property
    def num_layers_built(self) -> int:
        return self.num_hidden_layers if self.num_layers_used is None else self.num_layers_used

    @property
    def has_final_norm(self) -> bool:
        return self.num_layers_built == self.num_hidden_layers

    def is_sliding(self, layer_idx: int) -> bool:
        if self.sliding_window is None:
            return False
        if self.layer_types is None:
            return layer_idx % 2 == 0
        return self.layer_types[layer_idx] == SLIDING

    def penultimate_only(self) -> "Gemma2Config":
        """The same model with only the layers ``hidden_states[-2]`` needs (what EditMGT uses)."""
        return dataclasses.replace(self, num_layers_used=self.num_hidden_layers - 1)

    @classmethod
    def from_official(cls, d: Mapping) -> "Gemma2Config":
        """From a transformers ``Gemma2Config`` dict (``config.json`` of ``llm_encoder/``)."""
        d = dict(d)
        if d.get("model_type", "gemma2") != "gemma2":
            raise ValueError(f"model_type {d['model_type']!r}, expected 'gemma2'")
        base = cls()
        kw = {}
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "head_dim"):
            kw[name] = int(d.get(name, getattr(base, name)))
        kw["num_key_value_heads"] = int(d.get("num_key_value_heads") or kw["num_attention_heads"])
        # Very old configs name the activation hidden_act; hidden_activation wins when both are set.
        kw["hidden_activation"] = str(d.get("hidden_activation") or d.get("hidden_act") or base.hidden_activation)
        sw = d.get("sliding_window", base.sliding_window)
        kw["sliding_window"] = None if sw is None else int(sw)
        kw["query_pre_attn_scalar"] = float(d.get("query_pre_attn_scalar", base.query_pre_attn_scalar))
        cap = d.get("attn_logit_softcapping", base.attn_logit_softcapping)
        kw["attn_logit_softcapping"] = None if cap is None else float(cap)
        kw["rms_norm_eps"] = float(d.get("rms_norm_eps", base.rms_norm_eps))
        kw["rope_theta"] = float(d.get("rope_theta", base.rope_theta))
        kw["attention_bias"] = bool(d.get("attention_bias", False))
        if d.get("layer_types") is not None:
            kw["layer_types"] = tuple(str(t) for t in d["layer_types"])
        if d.get("rope_scaling"):
            raise ValueError(f"rope_scaling {d['rope_scaling']!r} is not supported")
        return cls(**kw)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if out["layer_types"] is not None:
            out["layer_types"] = list(out["layer_types"])
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> "Gemma2Config":
        d = checked_fields(cls, d)
        if d.get("layer_types") is not None:
            d["layer_types"] = tuple(d["layer_types"])
        return cls(**d)


def rope_tables(length: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """Rotate-half RoPE tables for positions 0..length-1: ``(cos, sin)`` [length, head_dim] float32.

    Computed in float32 as transformers does (inverse frequencies, angle product, cos/sin).
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x`` [B, L, ..., D]; ``cos``/``sin`` [L, D]. ``x*cos + rotate_half(x)*sin`` in float32."""
    shape = (1, cos.shape[0]) + (1,) * (x.ndim - 3) + (cos.shape[1],)
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    xf = x.astype(jnp.float32)
    half = xf.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def attention_mask(length: int, window: int | None) -> jax.Array:
    """[L, L] bool: query i may attend key j. Causal; with a window also ``i - j < window``."""
    i = jnp.arange(length)[:, None]
    j = jnp.arange(length)[None, :]
    mask = j <= i
    if window is not None:
        mask = mask & (i - j < window)
    return mask


class Gemma2Attention(nnx.Module):
    def __init__(self, cfg: Gemma2Config, layer_idx: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=cfg.attention_bias)
        h, k, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_kv_heads, self.groups, self.head_dim = k, h // k, d
        self.scaling = cfg.query_pre_attn_scalar ** -0.5
        self.softcap = cfg.attn_logit_softcapping
        self.sliding_window = cfg.sliding_window if cfg.is_sliding(layer_idx) else None
        self.q_proj = Linear(cfg.hidden_size, h * d, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(cfg.hidden_size, k * d, axes=("embed", "heads"), **kw)
        self.v_proj = Linear(cfg.hidden_size, k * d, axes=("embed", "heads"), **kw)
        self.o_proj = Linear(h * d, cfg.hidden_size, axes=("heads", "embed"), **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """``x`` [B, L, hidden] -> [B, L, hidden]; ``cos``/``sin`` [L, head_dim]."""
        b, n, _ = x.shape
        kh, g, d = self.num_kv_heads, self.groups, self.head_dim
        # Query head kv*g + i shares key/value head kv (transformers' repeat_kv layout).
        q = apply_rope(self.q_proj(x).reshape(b, n, kh, g, d), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(b, n, kh, d), cos, sin)
        v = self.v_proj(x).reshape(b, n, kh, d)
        logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * self.scaling
        if self.softcap is not None:
            logits = self.softcap * jnp.tanh(logits / self.softcap)
        logits = jnp.where(attention_mask(n, self.sliding_window), logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, n, kh * g * d)
        return self.o_proj(out)


class Gemma2MLP(nnx.Module):
    def __init__(self, cfg: Gemma2Config, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=False)
        self.act = _ACTIVATIONS[cfg.hidden_activation]
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Gemma2DecoderLayer(nnx.Module):
    def __init__(self, cfg: Gemma2Config, layer_idx: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        norm = lambda: RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, offset=1.0,  # noqa: E731
                               param_dtype=param_dtype)
        self.input_layernorm = norm()
        self.self_attn = Gemma2Attention(cfg, layer_idx, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.mlp = Gemma2MLP(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.post_feedforward_layernorm = norm()

    def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma2Model(nnx.Module):
    """``embed_tokens``, ``layers`` and (when all layers are built) the final ``norm``."""

    def __init__(self, cfg: Gemma2Config, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      embedding_init=partitioned(nnx.initializers.normal(0.02), ("vocab", "embed")),
                                      rngs=rngs)
        self.layers = nnx.List([Gemma2DecoderLayer(cfg, i, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                                for i in range(cfg.num_layers_built)])
        self.norm = (RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, offset=1.0, param_dtype=param_dtype)
                     if cfg.has_final_norm else None)


class Gemma2Encoder(nnx.Module):
    """Gemma-2 hidden states for a batch of token ids (no attention mask, as EditMGT calls it)."""

    def __init__(self, cfg: Gemma2Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = cfg
        self.model = Gemma2Model(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, ids: jax.Array, *, return_all: bool = False):
        """``ids`` [B, L] int32 -> ``hidden_states[-2]`` [B, L, hidden] in the activation dtype.

        The last decoder layer is not computed unless ``return_all``. With ``return_all=True`` returns
        ``(hidden_states[-2], hidden_states)`` where ``hidden_states`` is the list transformers returns:
        scaled embeddings, each layer's output, and the final-norm output of the last layer last
        (``num_hidden_layers + 1`` arrays [B, L, hidden]).
        """
        cfg = self.config
        if return_all and not cfg.has_final_norm:
            raise ValueError(f"return_all needs all {cfg.num_hidden_layers} layers and the final norm; this "
                             f"encoder was built with num_layers_used={cfg.num_layers_used}")
        m = self.model
        h = m.embed_tokens(ids)
        # transformers multiplies by sqrt(hidden) as a tensor of the activation dtype (55.5 in bf16 for 3072).
        h = h * jnp.asarray(math.sqrt(cfg.hidden_size), dtype=h.dtype)
        cos, sin = rope_tables(ids.shape[1], cfg.head_dim, cfg.rope_theta)
        run = cfg.num_hidden_layers if return_all else cfg.num_hidden_layers - 1
        states = [h]
        for layer in list(m.layers)[:run]:
            h = layer(h, cos, sin)
            states.append(h)
        if not return_all:
            return h
        states[-1] = m.norm(h)
        return states[-2], states


__all__ = ["Gemma2Config", "Gemma2Encoder", "apply_rope", "attention_mask", "rope_tables"]
