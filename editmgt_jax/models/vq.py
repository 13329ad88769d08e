"""VQ tokenizer: the diffusers ``VQModel`` (aMUSEd / Meissonic / EditMGT VQ-GAN) in Flax NNX.

    pixels [B, H, W, 3] in [0, 1]
      --encoder--> [B, H/f, W/f, latent_channels] --quant_conv--> latents [B, h, w, d]
      --quantize (nearest codeword)--> ids [B, h, w] int32
    ids --codebook lookup--> [B, h, w, d] --post_quant_conv--> --decoder--> pixels [B, H, W, 3]

``f = 2 ** (len(block_out_channels) - 1)`` (16 for the release: 1024 px -> 64 x 64 ids).
Pixels enter in [0, 1] with no rescaling to [-1, 1] (the EditMGT pipeline preprocesses with
``norm=False``), and the decoder output is returned raw; the pipeline clips it to [0, 1].

Encoder: ``conv_in`` -> ``down_blocks[i]`` (``layers_per_block`` pre-norm residual blocks, then a
stride-2 3x3 convolution on all blocks but the last, input zero-padded on the right and bottom only)
-> ``mid_block`` (residual, [self-attention], residual) -> GroupNorm -> SiLU -> ``conv_out``.
Decoder: ``conv_in`` -> ``mid_block`` -> ``up_blocks[i]`` (``layers_per_block + 1`` residual blocks,
then nearest x2 upsampling and a 3x3 convolution on all blocks but the last) -> GroupNorm -> SiLU ->
``conv_out``. Every GroupNorm uses eps 1e-6 and float32 statistics.

Module and attribute names mirror the diffusers state-dict keys (``encoder.down_blocks[0].resnets[1]
.conv2``), so :mod:`editmgt_jax.convert.vq` is a key table. Activations are NHWC.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from editmgt_jax.models.layers import Conv2d, Linear, checked_fields, ones, partitioned, zeros
from editmgt_jax.models.patch_encoder import PatchEncoder

GROUP_NORM_EPS = 1e-6       # diffusers Encoder/Decoder/ResnetBlock2D/mid-block attention all use 1e-6
DEFAULT_BETA = 0.25         # diffusers VQModel builds its VectorQuantizer with beta=0.25

# The released tokenizer's diffusers config (aMUSEd / Meissonic VQ-GAN, as built by diffusers'
# scripts/convert_amused.py); 146,244,675 parameters.
RELEASED_CONFIG: dict = {
    "_class_name": "VQModel",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 256, 512, 768],
    "down_block_types": ["DownEncoderBlock2D"] * 5,
    "up_block_types": ["UpDecoderBlock2D"] * 5,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 64,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "norm_type": "group",
    "num_vq_embeddings": 8192,
    "vq_embed_dim": None,
    "mid_block_add_attention": False,
    "lookup_from_codebook": True,
    "sample_size": 32,
    "scaling_factor": 0.18215,
}

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),   # torch nn.GELU() default: exact erf form
    "relu": jax.nn.relu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}

# diffusers VQModel.__init__ arguments that do not change what encode / quantize / decode compute:
# the latent scaling factor is only used by latent-diffusion pipelines, sample_size is a default
# resolution, lookup_from_codebook and force_upcast steer diffusers' own decode() and dtype handling.
_IGNORED_OFFICIAL_KEYS = frozenset({"sample_size", "scaling_factor", "lookup_from_codebook", "force_upcast"})


@dataclasses.dataclass(frozen=True)
class VQConfig:
    """Architecture of a diffusers ``VQModel`` with ``DownEncoderBlock2D``/``UpDecoderBlock2D`` blocks.

    Defaults are the released EditMGT tokenizer (:data:`RELEASED_CONFIG`).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512, 768)
    layers_per_block: int = 2
    latent_channels: int = 64
    num_vq_embeddings: int = 8192
    vq_embed_dim: int | None = None          # codeword width; None = latent_channels (diffusers)
    norm_num_groups: int = 32
    act_fn: str = "silu"
    mid_block_add_attention: bool = False
    beta: float = DEFAULT_BETA               # codebook-loss weight (diffusers legacy VQ loss)
    # "vq": nearest-codeword vector quantisation (the release). "fsq": finite scalar quantisation
    # (Mentzer et al. 2023): each of len(fsq_levels) latent channels is bounded and rounded to
    # fsq_levels[i] values; the id is the mixed-radix number of the digits. No codebook parameters,
    # no codebook or commitment loss, and every code is reachable (no collapse).
    quantizer: str = "vq"
    fsq_levels: tuple[int, ...] = ()
    # "conv": the released convolutional encoder. "patch": a token-local encoder (each id depends on
    # its own f x f patch only; editmgt_jax.models.patch_encoder), so untouched regions keep their ids.
    encoder: str = "conv"
    patch_encoder_layers: int = 2            # residual per-position MLP blocks of the "patch" encoder

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        problems = []
        if not self.block_out_channels:
            problems.append("block_out_channels is empty")
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels",
                     "num_vq_embeddings", "norm_num_groups"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.vq_embed_dim is not None and int(self.vq_embed_dim) < 1:
            problems.append(f"vq_embed_dim must be >= 1 or None, got {self.vq_embed_dim}")
        bad = [c for c in self.block_out_channels if c < 1 or c % self.norm_num_groups]
        if bad:
            problems.append(f"block_out_channels {list(self.block_out_channels)}: {bad} not divisible by "
                            f"norm_num_groups {self.norm_num_groups}")
        object.__setattr__(self, "fsq_levels", tuple(int(v) for v in self.fsq_levels))
        if self.quantizer not in ("vq", "fsq"):
            problems.append(f"quantizer {self.quantizer!r}: use 'vq' or 'fsq'")
        elif self.quantizer == "fsq":
            if not self.fsq_levels or min(self.fsq_levels) < 2:
                problems.append(f"fsq_levels {list(self.fsq_levels)}: need one or more levels, each >= 2")
            elif math.prod(self.fsq_levels) != self.num_vq_embeddings:
                problems.append(f"num_vq_embeddings {self.num_vq_embeddings} must equal the product of "
                                f"fsq_levels {list(self.fsq_levels)} = {math.prod(self.fsq_levels)}")
            if self.vq_embed_dim is not None and int(self.vq_embed_dim) != len(self.fsq_levels):
                problems.append(f"vq_embed_dim {self.vq_embed_dim} must be None or len(fsq_levels) "
                                f"= {len(self.fsq_levels)} with quantizer 'fsq'")
        elif self.fsq_levels:
            problems.append("fsq_levels is set but quantizer is 'vq'")
        if self.encoder not in ("conv", "patch"):
            problems.append(f"encoder {self.encoder!r}: use 'conv' or 'patch'")
        if self.act_fn not in _ACTIVATIONS:
            problems.append(f"act_fn {self.act_fn!r} not supported (choose from {sorted(_ACTIVATIONS)})")
        if problems:
            raise ValueError("VQConfig: " + "; ".join(problems))

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent position along each axis: one stride-2 stage per block but the last."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def codebook_dim(self) -> int:
        if self.quantizer == "fsq":
            return len(self.fsq_levels)
        return int(self.vq_embed_dim) if self.vq_embed_dim is not None else self.latent_channels

    @classmethod
    def from_official(cls, d: Mapping) -> "VQConfig":
        """From a diffusers ``VQModel`` ``config.json`` dict; ValueError names any unsupported value."""
        cls_name = dict(d).get("_class_name")
        d = {k: v for k, v in dict(d).items() if not k.startswith("_")}
        problems = []
        if cls_name not in (None, "VQModel"):
            problems.append(f"_class_name {cls_name!r} is not 'VQModel'")
        n = len(d.get("block_out_channels", (64,)))
        down = list(d.pop("down_block_types", ["DownEncoderBlock2D"]))
        up = list(d.pop("up_block_types", ["UpDecoderBlock2D"]))
        if any(t != "DownEncoderBlock2D" for t in down):
            problems.append(f"down_block_types {down}: only 'DownEncoderBlock2D' is supported")
        if any(t != "UpDecoderBlock2D" for t in up):
            problems.append(f"up_block_types {up}: only 'UpDecoderBlock2D' is supported")
        if len(down) != n or len(up) != n:
            problems.append(f"{len(down)} down and {len(up)} up block types for {n} block_out_channels")
        norm_type = d.pop("norm_type", "group")
        if norm_type != "group":
            problems.append(f"norm_type {norm_type!r}: only 'group' is supported (spatial norm is not)")
        for k in _IGNORED_OFFICIAL_KEYS:
            d.pop(k, None)
        # diffusers defaults for keys an older config may lack.
        kwargs = {"block_out_channels": (64,), "layers_per_block": 1, "latent_channels": 3,
                  "num_vq_embeddings": 256, "norm_num_groups": 32, "act_fn": "silu",
                  "mid_block_add_attention": True}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            problems.append(f"unknown VQModel config key(s) {unknown}")
        if problems:
            raise ValueError("VQ config: " + "; ".join(problems))
        kwargs.update(d)
        kwargs["mid_block_add_attention"] = bool(kwargs["mid_block_add_attention"])
        return cls(**kwargs)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["block_out_channels"] = list(self.block_out_channels)
        out["fsq_levels"] = list(self.fsq_levels)
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> "VQConfig":
        return cls(**checked_fields(cls, d))


# ----------------------------------------------------------------------------- layers
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
        self.act = _ACTIVATIONS[cfg.act_fn]
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
        self.act = _ACTIVATIONS[cfg.act_fn]
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
        self.act = _ACTIVATIONS[cfg.act_fn]
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


# ----------------------------------------------------------------------------- model
class VQModel(nnx.Module):
    """The VQ tokenizer.

    ``encode`` pixels -> latents, ``quantize`` latents -> ids (``self.quantize`` is the codebook
    module; calling it quantizes), ``encode_ids`` both, ``decode_ids`` ids -> pixels, and
    ``__call__`` the straight-through training forward.

    ``dtype`` is the compute dtype of convolutions and linears; normalisation statistics and
    codeword distances are always float32. Parameters are stored in ``param_dtype``.
    """

    def __init__(self, cfg: VQConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.cfg = cfg
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        d = cfg.codebook_dim
        if cfg.encoder == "patch":
            self.encoder = PatchEncoder(cfg.in_channels, cfg.latent_channels, cfg.downsample_factor,
                                        cfg.block_out_channels[-1], cfg.patch_encoder_layers, **kw)
        else:
            self.encoder = Encoder(cfg, **kw)
        self.quant_conv = Conv2d(cfg.latent_channels, d, 1, **kw)
        if cfg.quantizer == "fsq":
            self.quantize = FiniteScalarQuantizer(cfg.fsq_levels)
        else:
            self.quantize = VectorQuantizer(cfg.num_vq_embeddings, d, rngs=rngs, param_dtype=param_dtype)
        self.post_quant_conv = Conv2d(d, cfg.latent_channels, 1, **kw)
        self.decoder = Decoder(cfg, **kw)

    def _check_pixels(self, pixels: jax.Array) -> None:
        f = self.cfg.downsample_factor
        if pixels.ndim != 4 or pixels.shape[-1] != self.cfg.in_channels:
            raise ValueError(f"VQModel.encode: expected pixels [B, H, W, {self.cfg.in_channels}], "
                             f"got shape {tuple(pixels.shape)}")
        h, w = pixels.shape[1:3]
        if h % f or w % f:
            raise ValueError(f"VQModel.encode: image size {h}x{w} (HxW) is not a multiple of the "
                             f"downsample factor {f}")

    def encode(self, pixels: jax.Array) -> jax.Array:
        """pixels ``[B, H, W, in_channels]`` float in [0, 1] -> latents ``[B, H/f, W/f, d]`` (compute dtype).

        H and W must be multiples of ``cfg.downsample_factor`` (ValueError otherwise).
        """
        self._check_pixels(pixels)
        return self.quant_conv(self.encoder(pixels.astype(self.dtype)))

    def encode_ids(self, pixels: jax.Array) -> jax.Array:
        """pixels ``[B, H, W, in_channels]`` in [0, 1] -> ids ``[B, H/f, W/f] int32``."""
        return self.quantize(self.encode(pixels))

    def decode(self, codes: jax.Array) -> jax.Array:
        """Quantized latents ``[B, h, w, d]`` -> raw decoder output ``[B, h*f, w*f, out_channels]``."""
        return self.decoder(self.post_quant_conv(codes.astype(self.dtype)))

    def decode_ids(self, ids: jax.Array) -> jax.Array:
        """ids ``[B, h, w]`` int in ``[0, num_vq_embeddings)`` -> pixels ``[B, h*f, w*f, out_channels]``.

        The raw decoder output (not clipped to [0, 1]). Replace mask ids before calling: ids
        ``>= num_vq_embeddings`` turn the whole image to NaN rather than decoding silently.
        """
        return self.decode(self.quantize.lookup(ids))

    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
        """Training forward with the straight-through estimator.

        Returns ``(reconstruction [B, H, W, out_channels], aux, ids [B, h, w] int32)``. ``aux`` holds
        float32 scalars ``commitment`` = mean((sg(e) - z)^2) (gradient to the encoder),
        ``codebook`` = mean((e - sg(z))^2) (gradient to the codewords) and
        ``vq_loss`` = commitment + beta * codebook, diffusers' ``VectorQuantizer(legacy=True)`` loss.
        The reconstruction's forward value is ``decode_ids(ids)``; its gradient reaches the encoder
        as if quantization were the identity.
        """
        z = self.encode(pixels).astype(jnp.float32)
        if self.cfg.quantizer == "fsq":
            codes, ids = self.quantize.straight_through(z)
            zero = jnp.zeros((), jnp.float32)
            return self.decode(codes), {"commitment": zero, "codebook": zero, "vq_loss": zero}, ids
        ids = self.quantize(z)
        e = self.quantize.lookup(ids).astype(jnp.float32)
        sg = jax.lax.stop_gradient
        commitment = jnp.mean(jnp.square(sg(e) - z))
        codebook = jnp.mean(jnp.square(e - sg(z)))
        z_st = z + sg(e - z)
        recon = self.decode(z_st)
        aux = {"commitment": commitment, "codebook": codebook,
               "vq_loss": commitment + self.cfg.beta * codebook}
        return recon, aux, ids
