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
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from editmgt_jax.models.layers import Conv2d, checked_fields
from editmgt_jax.models.patch_encoder import PatchEncoder
from editmgt_jax.models.vq_layers import ACTIVATIONS, Decoder, Encoder, FiniteScalarQuantizer, VectorQuantizer

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
        if self.act_fn not in ACTIVATIONS:
            problems.append(f"act_fn {self.act_fn!r} not supported (choose from {sorted(ACTIVATIONS)})")
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
