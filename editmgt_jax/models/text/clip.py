"""CLIP text tower with projection (transformers ``CLIPTextModelWithProjection``).

EditMGT uses only ``text_embeds``: the final-layer-norm state at the pooling position, projected
by ``text_projection`` (no bias). Pre-LN transformer, learned absolute positions, causal attention
and no padding mask: pad tokens after the end-of-text token never influence earlier positions.

Submodule names mirror the official keys (``text_model.encoder.layers[i].self_attn.q_proj``), so
``editmgt_jax.convert.clip`` is a plain table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from editmgt_jax.models.layers import Linear, checked_fields, ones, partitioned, zeros

# transformers ACT2FN names -> activation. "gelu" is the exact (erf) form.
_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

# transformers keeps the legacy "argmax of the ids" pooling for configs with this eos id.
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Hyper-parameters of the CLIP text tower (transformers ``CLIPTextConfig`` field names)."""

    vocab_size: int = 49408
    hidden_size: int = 1024
    intermediate_size: int = 4096
    projection_dim: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    max_position_embeddings: int = 77
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} not supported; use one of {sorted(_ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_official(cls, d: Mapping) -> "CLIPTextConfig":
        """From a transformers ``CLIPTextConfig`` dict (``config.json`` of ``text_encoder/``).

        A full ``CLIPConfig`` (with ``text_config``) is accepted too; its top-level
        ``projection_dim`` applies. Defaults are transformers' ``CLIPTextConfig`` defaults.
        """
        d = dict(d)
        if isinstance(d.get("text_config"), Mapping):
            top = d
            d = dict(top["text_config"])
            if "projection_dim" in top:
                d["projection_dim"] = top["projection_dim"]
        hf = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "projection_dim": 512,
              "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
              "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": 2}
        return cls(**{k: type(v)(d.get(k, v)) for k, v in hf.items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "CLIPTextConfig":
        return cls(**checked_fields(cls, d))


class LayerNorm(nnx.Module):
    """torch ``nn.LayerNorm`` over the last axis: ``scale`` / ``bias`` [dim], statistics in float32."""

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(partitioned(ones, ("norm",))(jax.random.key(0), (dim,), param_dtype))
        self.bias = nnx.Param(partitioned(zeros, ("norm",))(jax.random.key(0), (dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class CLIPAttention(nnx.Module):
    """Causal multi-head self-attention with biased q/k/v/out projections."""

    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        w = cfg.hidden_size
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.q_proj = Linear(w, w, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(w, w, axes=("embed", "heads"), **kw)
        self.v_proj = Linear(w, w, axes=("embed", "heads"), **kw)
        self.out_proj = Linear(w, w, axes=("heads", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x`` [B, L, width] -> [B, L, width], same dtype."""
        b, n, _ = x.shape
        split = lambda t: t.reshape(b, n, self.num_heads, self.head_dim)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = logits * (self.head_dim ** -0.5)
        causal = jnp.tril(jnp.ones((n, n), dtype=bool))
        logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, -1)
        return self.out_proj(out)


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.self_attn = CLIPAttention(cfg, **kw)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.mlp = CLIPMLP(cfg, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        init = nnx.initializers.normal(0.02)
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                         embedding_init=partitioned(init, ("vocab", "embed")), rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype,
                                            param_dtype=param_dtype,
                                            embedding_init=partitioned(init, ("length", "embed")), rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """``ids`` [B, L] int -> [B, L, width]; positions are 0..L-1."""
        return self.token_embedding(ids) + self.position_embedding(jnp.arange(ids.shape[1]))[None]


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                                for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextTransformer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embeddings = CLIPEmbeddings(cfg, **kw)
        self.encoder = CLIPEncoder(cfg, **kw)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.final_layer_norm(self.encoder(self.embeddings(ids)))


def pooling_positions(ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Index of the pooled token per row, as transformers picks it. ``ids`` [B, L] -> [B] int32.

    With ``eos_token_id == 2`` (configs written before transformers fixed the eos id, e.g. the laion
    ViT-H-14 text config) the position is ``argmax(ids)``: the first occurrence of the largest id,
    which is the end-of-text token of the CLIP vocabulary. Otherwise it is the first position equal
    to ``eos_token_id`` (0 if there is none).
    """
    ids = ids.astype(jnp.int32)
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(ids, axis=-1).astype(jnp.int32)
    return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1).astype(jnp.int32)


class CLIPTextModelWithProjection(nnx.Module):
    """``text_model`` + ``text_projection`` (no bias)."""

    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.text_projection = Linear(cfg.hidden_size, cfg.projection_dim, axes=("embed", "mlp"), use_bias=False,
                                      rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                      kernel_init=nnx.initializers.normal(cfg.hidden_size ** -0.5))

    def __call__(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``ids`` [B, L] int32 (L <= max_position_embeddings, 77 in EditMGT) ->
        ``(text_embeds [B, projection_dim], last_hidden_state [B, L, width])`` in the activation dtype."""
        if ids.shape[-1] > self.config.max_position_embeddings:
            raise ValueError(f"CLIP ids have length {ids.shape[-1]}, more than max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        hidden = self.text_model(ids)
        pos = pooling_positions(ids, self.config.eos_token_id)
        pooled = jnp.take_along_axis(hidden, pos[:, None, None], axis=1)[:, 0]
        return self.text_projection(pooled), hidden


__all__ = ["CLIPTextConfig", "CLIPTextModelWithProjection", "pooling_positions"]
