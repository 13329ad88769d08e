"""Token-local VQ encoder: each latent position sees only its own ``f x f`` pixel patch.

The convolutional encoder of the released tokenizer has a receptive field of many latent cells and
GroupNorm statistics over the whole image, so changing one object re-codes tokens around it (and,
through the norm, anywhere). For editing that is the wrong property: positions the instruction does
not touch should keep their ids exactly, so that the transformer can copy them and the changed ids
mark the edit. ``PatchEncoder`` guarantees it by construction:

    pixels [B, H, W, C] --f x f stride-f conv--> [B, H/f, W/f, width]
      --(LayerNorm -> Linear -> SiLU -> Linear, residual) x layers--> LayerNorm --> Linear
      --> [B, H/f, W/f, latent_channels]

Every operation after the patchify convolution acts on one position (LayerNorm over channels), so
the latent at a position is a function of that patch's pixels alone. The decoder stays the
convolutional one: its context only shapes reconstruction, never the ids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from editmgt_jax.models.layers import Conv2d, Linear


class _PositionMLP(nnx.Module):
    def __init__(self, width: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm = nnx.LayerNorm(width, epsilon=1e-6, rngs=rngs, param_dtype=param_dtype)
        self.fc1 = Linear(width, 2 * width, axes=("embed", "mlp"), **kw)
        self.fc2 = Linear(2 * width, width, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.fc2(jax.nn.silu(self.fc1(self.norm(x))))


class PatchEncoder(nnx.Module):
    """``[B, H, W, in_channels]`` -> ``[B, H/f, W/f, latent_channels]``, each output from one patch.

    ``width`` is the last of ``block_out_channels``; ``layers`` is ``patch_encoder_layers``.
    """

    def __init__(self, in_channels: int, latent_channels: int, factor: int, width: int, layers: int, *,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.patchify = Conv2d(in_channels, width, factor, strides=factor, padding="VALID", **kw)
        self.blocks = nnx.List([_PositionMLP(width, **kw) for _ in range(layers)])
        self.norm_out = nnx.LayerNorm(width, epsilon=1e-6, rngs=rngs, param_dtype=param_dtype)
        self.proj_out = Linear(width, latent_channels, axes=("embed", "mlp"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.patchify(x)
        for block in self.blocks:
            x = block(x)
        return self.proj_out(self.norm_out(x))
