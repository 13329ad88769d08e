"""Shared building blocks with logical axis names on every parameter.

Parameter names follow Flax (``kernel``, ``bias``, ``scale``, ``embedding``); module attribute names
follow the official checkpoints so conversion is a key table (see ``editmgt_jax.convert``).
Activations are channels-last (NHWC) throughout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = Sequence[str | None]

default_kernel_init = nnx.initializers.lecun_normal()
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def partitioned(init, axes: Axes):
    # Logical axis names only: shardings are applied at the jit boundary (editmgt_jax.parallel),
    # never eagerly at construction, whatever nnx.use_eager_sharding says.
    return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)


class Linear(nnx.Linear):
    """``nnx.Linear`` with logical axes ``(in_axis, out_axis)`` on the kernel and ``(out_axis,)`` on the bias."""

    def __init__(self, in_features: int, out_features: int, *, axes: Axes = ("embed", "mlp"),
                 use_bias: bool = True, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
                 kernel_init=default_kernel_init, precision=None):
        super().__init__(in_features, out_features, use_bias=use_bias, dtype=dtype,
                         param_dtype=param_dtype, precision=precision,
                         kernel_init=partitioned(kernel_init, axes),
                         bias_init=partitioned(zeros, (axes[1],)), rngs=rngs)


class Conv2d(nnx.Conv):
    """NHWC convolution with kernel ``[kh, kw, in, out]`` and logical axes on kernel and bias."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int | tuple[int, int], *,
                 strides: int | tuple[int, int] = 1, padding="SAME", use_bias: bool = True,
                 rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
                 axes: Axes = ("kernel", "kernel", "conv_in", "conv_out"), kernel_init=default_kernel_init):
        ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        st = (strides, strides) if isinstance(strides, int) else tuple(strides)
        super().__init__(in_features, out_features, ks, strides=st, padding=padding,
                         use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                         kernel_init=partitioned(kernel_init, axes),
                         bias_init=partitioned(zeros, (axes[-1],)), rngs=rngs)

    def _pointwise(self) -> bool:
        one = lambda v: v is None or v == 1 or tuple(v) == (1, 1)
        return (tuple(self.kernel_size) == (1, 1) and one(self.strides) and one(self.input_dilation)
                and one(self.kernel_dilation) and self.feature_group_count == 1 and self.mask is None)

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        """A 1x1 stride-1 kernel is a matmul over channels, and is computed as one: the same numbers
        as the convolution, but XLA:CPU lowers the convolution's weight gradient to a slow direct
        convolution (a third of the small editor's train step), a matmul to a fast GEMM."""
        if not self._pointwise() or out_sharding is not None:
            return super().__call__(inputs, out_sharding=out_sharding)
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        kw = {} if self.preferred_element_type is None else {"preferred_element_type": self.preferred_element_type}
        y = jax.lax.dot_general(inputs, kernel.reshape(kernel.shape[-2:]),
                                (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision, **kw)
        return y + bias if bias is not None else y


class RMSNorm(nnx.Module):
    """diffusers ``RMSNorm``: ``x * rsqrt(mean(x^2) + eps) * scale``, statistics in float32.

    ``offset=1.0`` gives the Gemma form ``x * rsqrt(...) * (1 + scale)``.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, use_scale: bool = True, offset: float = 0.0,
                 axes: Axes = ("norm",), rngs: nnx.Rngs | None = None, param_dtype=jnp.float32,
                 scale_init=None):
        self.eps = eps
        self.offset = offset
        if use_scale:
            init = scale_init or (zeros if offset else ones)
            self.scale = nnx.Param(partitioned(init, axes)(jax.random.key(0), (dim,), param_dtype))
        else:
            self.scale = None

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        xf = x.astype(jnp.float32)
        var = jnp.mean(xf * xf, axis=-1, keepdims=True)
        y = xf * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * (self.offset + self.scale[...].astype(jnp.float32))
        return y.astype(dtype)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters (AdaLN), statistics in float32."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def param_count(state) -> int:
    """Number of scalars in an NNX state (concrete or abstract)."""
    import numpy as np
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


def checked_fields(cls, d: Mapping) -> dict:
    """``d`` as a dict after checking that every key is a field of the dataclass ``cls`` (the
    ``from_dict`` of the model configs: a checkpoint written for another version fails loudly)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
    return dict(d)
