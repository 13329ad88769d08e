"""Conditioning and position embeddings of the EditMGT transformer.

- sinusoidal embeddings of scalars (timesteps, micro-conditions), diffusers ``get_timestep_embedding``
  with ``flip_sin_to_cos=True`` and frequency shift 0: ``[cos(x f), sin(x f)]``;
- the timestep / pooled-text conditioning MLPs (``TimestepEmbedding``,
  ``CombinedTimestepTextProjEmbeddings``);
- Flux rotary position embeddings over ``(0, row, col)`` ids for any token grid.

Frequency and rotation tables depend only on static shapes, so they are built with numpy (float64,
then cast to float32) and enter the compiled program as constants.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from editmgt_jax.models.layers import Linear

SINUSOID_DIM = 256        # width of one sinusoidal embedding (timestep and each micro-condition)
NUM_MICRO_CONDS = 5       # [width, height, crop_top, crop_left, aesthetic]
DEFAULT_AESTHETIC = 6.0   # the aesthetic score fed when none is given (the release's demo value)


# ----------------------------------------------------------------------------- sinusoids
@functools.lru_cache(maxsize=None)
def _sinusoid_frequencies(dim: int, max_period: float) -> np.ndarray:
    """``exp(-ln(max_period) * j / (dim / 2))`` for j < dim / 2, ``[dim // 2] float32``.

    The exponent is formed in float32 as the reference does; the exponential is evaluated in float64
    and rounded once, which gives the correctly rounded float32 table.
    """
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def sinusoidal_embedding(x: jax.Array, dim: int = SINUSOID_DIM, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of scalars, cosine half first.

    Args:
      x: ``[N]`` any real or integer dtype.
    Returns:
      ``[N, dim] float32`` = ``[cos(x f), sin(x f)]`` with the frequencies of
      :func:`_sinusoid_frequencies`; the product and the trigonometric functions run in float32.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal embedding width must be even, got {dim}")
    freqs = jnp.asarray(_sinusoid_frequencies(dim, float(max_period)))
    args = x.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def micro_condition_embedding(micro_conds: jax.Array, dim: int = SINUSOID_DIM) -> jax.Array:
    """Embed each micro-condition and concatenate per sample.

    Args:
      micro_conds: ``[B, K]`` float (``K`` = 5: width, height, crop_top, crop_left, aesthetic).
    Returns:
      ``[B, K * dim] float32``, the conditions in input order.
    """
    b, k = micro_conds.shape
    return sinusoidal_embedding(micro_conds.reshape(b * k), dim).reshape(b, k * dim)


def micro_conditions(width, height, crop_top=0, crop_left=0, aesthetic=DEFAULT_AESTHETIC) -> np.ndarray:
    """The micro-conditions ``[..., 5] float32`` ``[width, height, crop_top, crop_left, aesthetic]``
    (sizes in pixels). Arguments broadcast: scalars give one row ``[5]``, ``[B]`` arrays ``[B, 5]``."""
    fields = (width, height, crop_top, crop_left, aesthetic)
    return np.stack(np.broadcast_arrays(*(np.asarray(v, np.float32) for v in fields)), axis=-1)


class TimestepEmbedding(nnx.Module):
    """``linear_1 -> SiLU -> linear_2`` (diffusers ``TimestepEmbedding`` / ``PixArtAlphaTextProjection``).

    ``[B, in_features] -> [B, out_features]`` in ``dtype``.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 in_axis: str | None = "embed", rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.linear_1 = Linear(in_features, out_features, axes=(in_axis, "mlp"), use_bias=use_bias,
                               rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear_2 = Linear(out_features, out_features, axes=("mlp", "embed"), use_bias=use_bias,
                               rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class CombinedTimestepTextProjEmbeddings(nnx.Module):
    """``timestep_embedder(sin256(t)) + text_embedder(cond)`` (diffusers module of the same name).

    ``t``: ``[B]`` float, already scaled (the transformer multiplies the step index by 1000);
    ``cond``: ``[B, dim]``. Returns ``[B, dim]`` in ``dtype``.
    """

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.dtype = dtype
        self.timestep_embedder = TimestepEmbedding(SINUSOID_DIM, dim, in_axis=None, rngs=rngs,
                                                   dtype=dtype, param_dtype=param_dtype)
        self.text_embedder = TimestepEmbedding(dim, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, t: jax.Array, cond: jax.Array) -> jax.Array:
        t_emb = self.timestep_embedder(sinusoidal_embedding(t).astype(self.dtype))
        return t_emb + self.text_embedder(cond)


# ----------------------------------------------------------------------------- rotary positions
def grid_position_ids(height: int, width: int) -> np.ndarray:
    """Position ids ``(0, row, col)`` of a ``height x width`` token grid, row-major: ``[h*w, 3] float64``."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    ids = np.zeros((height * width, 3), np.float64)
    ids[:, 1] = rows.reshape(-1)
    ids[:, 2] = cols.reshape(-1)
    return ids


def rope_tables(ids: np.ndarray, axes_dims: Sequence[int], theta: float = 10000.0
                ) -> tuple[np.ndarray, np.ndarray]:
    """Flux rotary tables for position ids.

    For axis ``a`` of width ``d_a``: ``freq_k = theta^(-2k/d_a)``, angle = ``ids[:, a] * freq_k``,
    each cos / sin value repeated twice (interleaved pairs), axes concatenated.

    Args:
      ids: ``[S, len(axes_dims)]`` positions (float or int).
    Returns:
      ``(cos, sin)``, each ``[S, sum(axes_dims)] float32`` (computed in float64).
    """
    ids = np.asarray(ids, np.float64)
    if ids.ndim != 2 or ids.shape[1] != len(axes_dims):
        raise ValueError(f"position ids must be [S, {len(axes_dims)}], got {ids.shape}")
    cos, sin = [], []
    for a, d in enumerate(axes_dims):
        if d % 2:
            raise ValueError(f"rotary axis widths must be even, got {tuple(axes_dims)}")
        freqs = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
        angles = np.outer(ids[:, a], freqs)
        cos.append(np.repeat(np.cos(angles), 2, axis=1))
        sin.append(np.repeat(np.sin(angles), 2, axis=1))
    return (np.concatenate(cos, axis=1).astype(np.float32),
            np.concatenate(sin, axis=1).astype(np.float32))


@functools.lru_cache(maxsize=64)
def _joint_rope_tables(num_text: int, height: int, width: int, copies: int,
                       axes_dims: tuple[int, ...], theta: float) -> tuple[np.ndarray, np.ndarray]:
    grid = grid_position_ids(height, width)
    ids = np.concatenate([np.zeros((num_text, 3))] + [grid] * copies, axis=0)
    return rope_tables(ids, axes_dims, theta)


def joint_rope_tables(num_text: int, height: int, width: int, *, copies: int,
                      axes_dims: Sequence[int], theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """Rotary tables for the joint sequence ``[text, image grid, (reference grid)]``.

    Text ids are all zero (identity rotation); every image-like segment (target, then reference when
    ``copies`` = 2) uses the same ``(0, row, col)`` ids of the ``height x width`` grid.
    Returns ``(cos, sin)``, each ``[num_text + copies*h*w, head_dim] float32``.
    """
    cos, sin = _joint_rope_tables(int(num_text), int(height), int(width), int(copies),
                                  tuple(int(d) for d in axes_dims), float(theta))
    return jnp.asarray(cos), jnp.asarray(sin)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate adjacent pairs: ``x*cos + rot(x)*sin`` with ``rot(x)[2k] = -x[2k+1]``, ``rot(x)[2k+1] = x[2k]``.

    Args:
      x: ``[B, H, S, D]`` any float dtype.
      cos, sin: ``[S, D] float32``.
    Returns:
      ``[B, H, S, D]`` in ``x.dtype``; the rotation is computed in float32.
    """
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*xf.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xf.shape)
    return (xf * cos + rotated * sin).astype(x.dtype)


__all__ = [
    "SINUSOID_DIM", "NUM_MICRO_CONDS", "DEFAULT_AESTHETIC", "sinusoidal_embedding", "micro_condition_embedding",
    "micro_conditions",
    "TimestepEmbedding", "CombinedTimestepTextProjEmbeddings", "grid_position_ids", "rope_tables",
    "joint_rope_tables", "apply_rope",
]
