"""A small trainable text encoder for training the editor from scratch.

The released model conditions on two frozen encoders (Gemma-2 hidden states and a CLIP pooled
vector). A model trained from scratch on a small edit set has no use for billion-parameter
encoders: this module turns word ids into the same two tensors the transformer expects, and is
trained jointly with it.

    ids [B, L] int32 --embed + positions--> pre-norm transformer layers --> RMSNorm
        --> text_states [B, L, joint_attention_dim]   (per-token, like Gemma's hidden states)
        --> pooled      [B, pooled_projection_dim]    (masked mean over real tokens, like CLIP's)

Padding (``pad_id``) is excluded from attention keys and from the pooled mean; position 0 is always
attended so an empty prompt (all padding, the classifier-free-guidance "unconditional" input) is
well defined. Like the released Gemma path, the transformer sees every position including padding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from editmgt_jax.models.layers import Linear, RMSNorm, checked_fields, gelu_tanh, partitioned


@dataclasses.dataclass(frozen=True)
class SmallTextConfig:
    vocab_size: int = 1024
    max_length: int = 32
    width: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4
    joint_attention_dim: int = 64       # width of text_states, = the transformer's joint_attention_dim
    pooled_projection_dim: int = 64     # width of pooled, = the transformer's pooled_projection_dim
    pad_id: int = 0

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"SmallTextConfig: width {self.width} is not divisible by "
                             f"num_heads {self.num_heads}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "SmallTextConfig":
        return cls(**checked_fields(cls, d))


class SmallTextAttention(nnx.Module):
    def __init__(self, cfg: SmallTextConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.num_heads = cfg.num_heads
        self.to_qkv = Linear(cfg.width, 3 * cfg.width, axes=("embed", "heads"), rngs=rngs,
                             dtype=dtype, param_dtype=param_dtype)
        self.to_out = Linear(cfg.width, cfg.width, axes=("heads", "embed"), rngs=rngs,
                             dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        """x [B, L, W]; key_mask [B, L] bool (True = may be attended) -> [B, L, W]."""
        b, n, w = x.shape
        h = self.num_heads
        q, k, v = jnp.split(self.to_qkv(x).reshape(b, n, 3, h, w // h), 3, axis=2)
        q, k, v = (t[:, :, 0] for t in (q, k, v))                      # [B, L, h, d]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(w / h)
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, w)
        return self.to_out(out)


class SmallTextLayer(nnx.Module):
    def __init__(self, cfg: SmallTextConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.norm1 = RMSNorm(cfg.width, param_dtype=param_dtype)
        self.attn = SmallTextAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm2 = RMSNorm(cfg.width, param_dtype=param_dtype)
        hidden = cfg.mlp_ratio * cfg.width
        self.fc1 = Linear(cfg.width, hidden, axes=("embed", "mlp"), rngs=rngs, dtype=dtype,
                          param_dtype=param_dtype)
        self.fc2 = Linear(hidden, cfg.width, axes=("mlp", "embed"), rngs=rngs, dtype=dtype,
                          param_dtype=param_dtype)

    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.fc2(gelu_tanh(self.fc1(self.norm2(x))))


class SmallTextEncoder(nnx.Module):
    """Word ids -> (text_states, pooled), trained together with the editor transformer."""

    def __init__(self, cfg: SmallTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.config = cfg
        self.dtype = dtype
        init = nnx.initializers.normal(0.02)
        self.token_embedding = nnx.Embed(
            cfg.vocab_size, cfg.width, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
            embedding_init=partitioned(init, ("vocab", "embed")))
        self.position_embedding = nnx.Embed(
            cfg.max_length, cfg.width, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
            embedding_init=partitioned(init, ("length", "embed")))
        self.layers = nnx.List([SmallTextLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                                for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.width, param_dtype=param_dtype)
        self.states_proj = Linear(cfg.width, cfg.joint_attention_dim, axes=("embed", "mlp"),
                                  rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.pooled_proj = Linear(cfg.width, cfg.pooled_projection_dim, axes=("embed", "mlp"),
                                  rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def token_mask(self, ids: jax.Array) -> jax.Array:
        """[B, L] bool: real tokens, plus position 0 so an all-padding prompt is well defined."""
        first = jnp.arange(ids.shape[-1]) == 0
        return (ids != self.config.pad_id) | first

    def __call__(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """ids [B, L] int32 (L <= max_length) -> (text_states [B, L, joint_attention_dim] f32,
        pooled [B, pooled_projection_dim] f32)."""
        cfg = self.config
        if ids.ndim != 2:
            raise ValueError(f"SmallTextEncoder: expected ids [B, L], got shape {ids.shape}")
        if ids.shape[1] > cfg.max_length:
            raise ValueError(f"SmallTextEncoder: {ids.shape[1]} tokens exceed max_length "
                             f"{cfg.max_length}")
        mask = self.token_mask(ids)
        x = self.token_embedding(ids) + self.position_embedding(jnp.arange(ids.shape[1]))[None]
        for layer in self.layers:
            x = layer(x, mask)
        x = self.final_norm(x)
        states = self.states_proj(x).astype(jnp.float32)
        w = mask.astype(jnp.float32)[..., None]
        mean = jnp.sum(x.astype(jnp.float32) * w, axis=1) / jnp.sum(w, axis=1)
        pooled = self.pooled_proj(mean.astype(x.dtype)).astype(jnp.float32)
        return states, pooled
