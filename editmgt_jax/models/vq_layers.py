"""Layers of the VQ tokenizer (diffusers ``VQModel`` blocks) and its two quantizers.

Module and attribute names mirror the diffusers state-dict keys; :mod:`editmgt_jax.models.vq`
assembles them (``VQModel``) and owns the configuration (``VQConfig``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from editmgt_jax.models.layers import Conv2d, Linear, ones, partitioned, zeros

if TYPE_CHECKING:
    from editmgt_jax.models.vq import VQConfig

GROUP_NORM_EPS = 1e-6       # diffusers Encoder/Decoder/ResnetBlock2D/mid-block attention all use 1e-6

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),   # torch nn.GELU() default: exact erf form
    "relu": jax.nn.relu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}


class GroupNorm(nnx.Module):
    """``torch.nn.GroupNorm`` over NHWC channels; statistics in float32, biased variance.

    ``[B, H, W, C]`` any float dtype -> same shape and dtype. Params ``scale``, ``bias`` ``[C]``.
    """

    def __init__(self, num_channels: int, num_groups: int, *, eps: float = GROUP_NORM_EPS,
                 param_dtype=jnp.float32):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels not divisible by {num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        key = jax.random.key(0)  # constant initialisers: the key is unused
        self.scale = nnx.Param(partitioned(ones, ("norm",))(key, (num_channels,), param_dtype))
        self.bias = nnx.Param(partitioned(zeros, ("norm",))(key, (num_channels,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        g = self.num_groups
        xf = x.astype(jnp.float32).reshape(b, h, w, g, c // g)
        mean = jnp.mean(xf, axis=(1, 2, 4), keepdims=True)
        # Two-pass variance: no cancellation for large-mean activations.
        var = jnp.mean(jnp.square(xf - mean), axis=(1, 2, 4), keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class ResnetBlock(nnx.Module):
    """diffusers ``ResnetBlock2D`` without time embedding: ``x + conv2(act(norm2(conv1(act(norm1(x))))))``.

    ``[B, H, W, in_channels]`` -> ``[B, H, W, out_channels]``; a 1x1 ``conv_shortcut`` maps the
    residual when the channel count changes.
    """

    def __init__(self, in_channels: int, out_channels: int, cfg: VQConfig, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.act = ACTIVATIONS[cfg.act_fn]
        self.norm1 = GroupNorm(in_channels, cfg.norm_num_groups, param_dtype=param_dtype)
        self.conv1 = Conv2d(in_channels, out_channels, 3, **kw)
        self.norm2 = GroupNorm(out_channels, cfg.norm_num_groups, param_dtype=param_dtype)
        self.conv2 = Conv2d(out_channels, out_channels, 3, **kw)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return skip + h


class Downsample(nnx.Module):
    """3x3 stride-2 convolution; the input is zero-padded by one on the right and bottom only.

    diffusers ``Downsample2D(padding=0)``: ``[B, H, W, C]`` -> ``[B, ceil(H/2), ceil(W/2), C]``.
    """

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.conv = Conv2d(channels, channels, 3, strides=2, padding=((0, 1), (0, 1)), rngs=rngs,
                           dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2 upsampling then a 3x3 convolution: ``[B, H, W, C]`` -> ``[B, 2H, 2W, C]``."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.conv = Conv2d(channels, channels, 3, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class MidBlockAttention(nnx.Module):
    """Single-head spatial self-attention with GroupNorm and a residual (diffusers mid-block ``Attention``).

    ``[B, H, W, C]`` -> same. Head width = C, scale ``C ** -0.5``, softmax in float32.
    """

    def __init__(self, channels: int, cfg: VQConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.group_norm = GroupNorm(channels, cfg.norm_num_groups, param_dtype=param_dtype)
        self.to_q = Linear(channels, channels, axes=("embed", "heads"), **kw)
        self.to_k = Linear(channels, channels, axes=("embed", "heads"), **kw)
        self.to_v = Linear(channels, channels, axes=("embed", "heads"), **kw)
        self.to_out = nnx.List([Linear(channels, channels, axes=("heads", "embed"), **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = self.to_q(y), self.to_k(y), self.to_v(y)
        logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * (1.0 / math.sqrt(c))
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = self.to_out[0](jnp.einsum("bqk,bkc->bqc", probs, v))
        return x + out.reshape(b, h, w, c)


class MidBlock(nnx.Module):
    """diffusers ``UNetMidBlock2D`` (one layer): ``resnets[1](attentions[0](resnets[0](x)))``, C -> C."""

    def __init__(self, channels: int, cfg: VQConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([ResnetBlock(channels, channels, cfg, **kw) for _ in range(2)])
        self.attentions = (nnx.List([MidBlockAttention(channels, cfg, **kw)])
                           if cfg.mid_block_add_attention else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock(nnx.Module):
    """``layers_per_block`` residual blocks, then (unless last) a stride-2 :class:`Downsample`."""

    def __init__(self, in_channels: int, out_channels: int, add_downsample: bool, cfg: VQConfig, *,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([ResnetBlock(in_channels if j == 0 else out_channels, out_channels, cfg, **kw)
                                 for j in range(cfg.layers_per_block)])
        self.downsamplers = nnx.List([Downsample(out_channels, **kw)]) if add_downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock(nnx.Module):
    """``layers_per_block + 1`` residual blocks, then (unless last) a x2 :class:`Upsample`."""

    def __init__(self, in_channels: int, out_channels: int, add_upsample: bool, cfg: VQConfig, *,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([ResnetBlock(in_channels if j == 0 else out_channels, out_channels, cfg, **kw)
                                 for j in range(cfg.layers_per_block + 1)])
        self.upsamplers = nnx.List([Upsample(out_channels, **kw)]) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nnx.Module):
    """``[B, H, W, in_channels]`` -> ``[B, H/f, W/f, latent_channels]`` (before ``quant_conv``)."""

    def __init__(self, cfg: VQConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        ch = cfg.block_out_channels
        self.act = ACTIVATIONS[cfg.act_fn]
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, **kw)
        self.down_blocks = nnx.List([
            DownEncoderBlock(ch[max(i - 1, 0)], ch[i], i < len(ch) - 1, cfg, **kw) for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], cfg, **kw)
        self.conv_norm_out = GroupNorm(ch[-1], cfg.norm_num_groups, param_dtype=param_dtype)
        self.conv_out = Conv2d(ch[-1], cfg.latent_channels, 3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """``[B, h, w, latent_channels]`` (after ``post_quant_conv``) -> ``[B, h*f, w*f, out_channels]``."""

    def __init__(self, cfg: VQConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        rev = cfg.block_out_channels[::-1]
        self.act = ACTIVATIONS[cfg.act_fn]
        self.conv_in = Conv2d(cfg.latent_channels, rev[0], 3, **kw)
        self.mid_block = MidBlock(rev[0], cfg, **kw)
        self.up_blocks = nnx.List([
            UpDecoderBlock(rev[max(i - 1, 0)], rev[i], i < len(rev) - 1, cfg, **kw) for i in range(len(rev))])
        self.conv_norm_out = GroupNorm(rev[-1], cfg.norm_num_groups, param_dtype=param_dtype)
        self.conv_out = Conv2d(rev[-1], cfg.out_channels, 3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


class VectorQuantizer(nnx.Module):
    """Codebook ``embedding.embedding`` ``[num_vq_embeddings, codebook_dim]`` (logical axes vocab, embed).

    Calling it maps latents ``[B, h, w, d]`` to ids ``[B, h, w] int32``: the nearest codeword by
    Euclidean distance, first index on ties (``argmin(cdist)`` of the reference).
    """

    def __init__(self, num_embeddings: int, dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        bound = 1.0 / num_embeddings   # diffusers initialises the codebook U(-1/n, 1/n)
        init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa: E731
        self.embedding = nnx.Embed(num_embeddings, dim, param_dtype=param_dtype,
                                   embedding_init=partitioned(init, ("vocab", "embed")), rngs=rngs)

    @property
    def codebook(self) -> jax.Array:
        return self.embedding.embedding[...]

    def __call__(self, latents: jax.Array) -> jax.Array:
        e = self.codebook.astype(jnp.float32)
        z = latents.astype(jnp.float32)
        # argmin_j ||z - e_j||^2 = argmin_j (||e_j||^2 - 2 z.e_j): dropping the per-row ||z||^2
        # constant keeps the compared values small, so float32 rounding does not blur near-ties.
        # HIGHEST precision stops accelerators from rounding the dot products to bf16/TF32.
        dots = jnp.einsum("bhwd,nd->bhwn", z, e, precision=jax.lax.Precision.HIGHEST)
        dist = jnp.sum(e * e, axis=-1) - 2.0 * dots
        return jnp.argmin(dist, axis=-1).astype(jnp.int32)

    def lookup(self, ids: jax.Array) -> jax.Array:
        """ids ``[B, h, w]`` int -> codewords ``[B, h, w, d]`` (param dtype); ids >= n give NaN."""
        return jnp.take(self.codebook, ids, axis=0, mode="fill", fill_value=jnp.nan)


class FiniteScalarQuantizer(nnx.Module):
    """Finite scalar quantisation: latents ``[B, h, w, len(levels)]`` -> ids ``[B, h, w] int32``.

    Channel ``i`` is bounded to ``levels[i]`` values with ``tanh`` and rounded; codes are the
    rounded values scaled to [-1, 1) (``(q) / (levels[i] // 2)``) and the id is the mixed-radix
    number of the digits ``q + levels[i] // 2`` (first channel least significant). Parameter-free:
    ``codebook`` enumerates the ``prod(levels)`` codes. Same interface as :class:`VectorQuantizer`.
    """

    EPS = 1e-3

    def __init__(self, levels: tuple[int, ...]):
        self.levels = tuple(int(v) for v in levels)
        self.size = math.prod(self.levels)
        basis, b = [], 1
        for v in self.levels:
            basis.append(b)
            b *= v
        self.basis = tuple(basis)

    def _bound(self, z: jax.Array) -> jax.Array:
        levels = jnp.asarray(self.levels, jnp.float32)
        half_l = (levels - 1) * (1 + self.EPS) / 2
        offset = jnp.where(levels % 2 == 0, 0.5, 0.0)
        shift = jnp.arctanh(offset / half_l)
        return jnp.tanh(z.astype(jnp.float32) + shift) * half_l - offset

    def straight_through(self, latents: jax.Array) -> tuple[jax.Array, jax.Array]:
        """latents ``[..., d]`` -> (codes ``[..., d]`` f32 with a straight-through gradient, ids)."""
        bounded = self._bound(latents)
        q = bounded + jax.lax.stop_gradient(jnp.round(bounded) - bounded)
        half = jnp.asarray([v // 2 for v in self.levels], jnp.float32)
        digits = jnp.round(jax.lax.stop_gradient(q)).astype(jnp.int32) + half.astype(jnp.int32)
        ids = jnp.sum(digits * jnp.asarray(self.basis, jnp.int32), axis=-1)
        return q / half, ids.astype(jnp.int32)

    def __call__(self, latents: jax.Array) -> jax.Array:
        return self.straight_through(latents)[1]

    @property
    def codebook(self) -> jax.Array:
        """``[prod(levels), len(levels)]`` f32: the code of every id."""
        return self.lookup(jnp.arange(self.size, dtype=jnp.int32))

    def lookup(self, ids: jax.Array) -> jax.Array:
        """ids ``[...]`` int -> codes ``[..., len(levels)]`` f32; ids outside ``[0, prod(levels))`` give NaN."""
        ids = jnp.asarray(ids, jnp.int32)
        levels = jnp.asarray(self.levels, jnp.int32)
        half = levels // 2
        digits = (ids[..., None] // jnp.asarray(self.basis, jnp.int32)) % levels
        codes = (digits - half).astype(jnp.float32) / half.astype(jnp.float32)
        valid = ((ids >= 0) & (ids < self.size))[..., None]
        return jnp.where(valid, codes, jnp.nan)
