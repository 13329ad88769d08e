"""The EditMGT transformer: token embedding, 2x down-sampling, MM-DiT + single-stream blocks with a
reference stream, 2x up-sampling and the logits head.

Attribute names mirror the official ``Transformer2DModel`` state dict, so the converter
(:mod:`editmgt_jax.convert.transformer`) is a key table. Activations are channels-last.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from editmgt_jax.models.attention import IMPLEMENTATIONS
from editmgt_jax.models.attention import CAPTURE_MODES, Segments
from editmgt_jax.models.blocks import DualStreamBlock, SingleStreamBlock
from editmgt_jax.models.embeddings import (NUM_MICRO_CONDS, SINUSOID_DIM, CombinedTimestepTextProjEmbeddings,
                                           TimestepEmbedding, joint_rope_tables, micro_condition_embedding)
from editmgt_jax.models.layers import Conv2d, Linear, RMSNorm, partitioned
from editmgt_jax.models.transformer_config import (  # noqa: F401  (RELEASED_CONFIG: configs/editmgt_1024.py)
    RELEASED_CONFIG, TransformerConfig)
from editmgt_jax.parallel import block_gather, gathered_block_call

NORM_EPS = 1e-6


# ----------------------------------------------------------------------------- image-side modules
class LinearProjector(nnx.Module):
    """Text connector: ``projector`` Linear ``joint_attention_dim -> dim`` with bias."""

    def __init__(self, in_dim: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.projector = Linear(in_dim, dim, axes=("mlp", "embed"), rngs=rngs, dtype=dtype,
                                param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.projector(x)


class ConvEmbed(nnx.Module):
    """Token ids ``[B, H, W] int32`` -> ``embeddings`` -> RMSNorm -> 1x1 conv -> ``[B, H, W, dim]``."""

    def __init__(self, vocab_size: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.embeddings = nnx.Embed(vocab_size, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                    embedding_init=partitioned(nnx.initializers.normal(0.02),
                                                               ("vocab", "embed")))
        self.layer_norm = RMSNorm(dim, eps=NORM_EPS, param_dtype=param_dtype)
        self.conv = Conv2d(dim, dim, 1, use_bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.conv(self.layer_norm(self.embeddings(ids)))


class Downsample(nnx.Module):
    """RMSNorm over channels, then 2x2 stride-2 conv: ``[B, H, W, C] -> [B, H/2, W/2, C]`` (H, W even)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.norm = RMSNorm(dim, eps=NORM_EPS, param_dtype=param_dtype)
        # The reference zero-pads right/bottom by one first; a 2x2 stride-2 window never reads that
        # padding when H and W are even, so VALID padding is the same computation.
        self.conv = Conv2d(dim, dim, 2, strides=2, padding="VALID", use_bias=False, rngs=rngs,
                           dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(self.norm(x))


class ConvTranspose2x2(nnx.Module):
    """2x2 stride-2 transposed convolution without bias, torch ``ConvTranspose2d`` semantics.

    ``out[b, 2i+u, 2j+v, o] = sum_c x[b, i, j, c] * kernel[u, v, c, o]``: with stride equal to the
    kernel size every input pixel writes its own 2x2 output block, so the layer is one einsum and a
    reshape (no kernel flip). ``kernel`` is ``[2, 2, in, out]`` (torch ``[in, out, 2, 2]`` transposed).
    """

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.dtype = dtype
        init = partitioned(nnx.initializers.lecun_normal(in_axis=2, out_axis=3),
                           ("kernel", "kernel", "conv_in", "conv_out"))
        self.kernel = nnx.Param(init(rngs.params(), (2, 2, in_features, out_features), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        k = self.kernel[...].astype(self.dtype)
        y = jnp.einsum("bijc,uvco->biujvo", x.astype(self.dtype), k)
        return y.reshape(b, 2 * h, 2 * w, k.shape[-1])


class Upsample(nnx.Module):
    """RMSNorm over channels, then the 2x2 stride-2 transposed conv: ``[B, h, w, C] -> [B, 2h, 2w, C]``."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.norm = RMSNorm(dim, eps=NORM_EPS, param_dtype=param_dtype)
        self.conv = ConvTranspose2x2(dim, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(self.norm(x))


class DownBlock(nnx.Module):
    def __init__(self, dim: int, **kw):
        self.downsample = Downsample(dim, **kw)

    def __call__(self, x):
        return self.downsample(x)


class UpBlock(nnx.Module):
    def __init__(self, dim: int, **kw):
        self.upsample = Upsample(dim, **kw)

    def __call__(self, x):
        return self.upsample(x)


class ConvMlmLayer(nnx.Module):
    """Logits head: 1x1 conv -> RMSNorm -> 1x1 conv to ``codebook_size`` channels."""

    def __init__(self, dim: int, codebook_size: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(use_bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conv1 = Conv2d(dim, dim, 1, **kw)
        self.layer_norm = RMSNorm(dim, eps=NORM_EPS, param_dtype=param_dtype)
        self.conv2 = Conv2d(dim, codebook_size, 1, axes=("kernel", "kernel", "conv_in", "vocab"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv2(self.layer_norm(self.conv1(x)))


# ----------------------------------------------------------------------------- the model
def _new_block(kind: str, dim: int, num_heads: int, head_dim: int, mlp_ratio: int, dtype, param_dtype,
               rngs: nnx.Rngs):
    cls = DualStreamBlock if kind == "dual" else SingleStreamBlock
    return cls(dim, num_heads, head_dim, mlp_ratio=mlp_ratio, rngs=rngs, dtype=dtype, param_dtype=param_dtype)


# Under a trace (``nnx.eval_shape``, a jitted init) each block is built in its own cached sub-trace:
# tracing all blocks into one program makes the abstract build of the released model take half a
# minute (jax inspects the whole trace on every rng update), one sub-trace per kind a few seconds.
_new_block_traced = nnx.jit(_new_block, static_argnums=(0, 1, 2, 3, 4, 5, 6))


class EditTransformer(nnx.Module):
    """EditMGT transformer (official ``Transformer2DModel``) with the reference stream.

    Parameters are created in ``param_dtype``; activations run in ``dtype`` (norm statistics, RoPE,
    sinusoids, softmax and the logits in float32). ``remat=True`` recomputes each block's
    activations in the backward pass instead of storing them (training memory). ``attention`` picks
    the attention implementation (:mod:`editmgt_jax.models.attention`; ``None``: the backend's).
    ``scan_blocks=True`` runs each run of consecutive blocks of one kind that capture nothing as one
    ``jax.lax.scan`` over their parameters stacked at call time (one block body in the program
    instead of one per block: the compiler sees a program of a few blocks); the parameters keep
    their per-block layout (checkpoints and the converter are unchanged) and the outputs are the
    same. Off by default: see bench/RESULTS.md, "Compilation cache", for the compile times measured.
    """

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: bool = False, attention: str | None = None, scan_blocks: bool = False):
        if attention is not None and attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention implementation {attention!r}: use one of {IMPLEMENTATIONS}")
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        self.attention = attention
        self.scan_blocks = scan_blocks
        d = cfg.inner_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)

        self.connector = (LinearProjector(cfg.joint_attention_dim, d, **kw)
                          if cfg.connector_type == "linear" else None)
        self.context_embedder = Linear(d, d, axes=("embed", "mlp"), **kw)
        self.encoder_proj_layer_norm = RMSNorm(d, eps=NORM_EPS, param_dtype=param_dtype)
        self.cond_embed = TimestepEmbedding(cfg.pooled_projection_dim + NUM_MICRO_CONDS * SINUSOID_DIM, d,
                                            use_bias=False, in_axis=None, **kw)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(d, **kw)

        self.embed = ConvEmbed(cfg.vocab_size, d, **kw)
        self.down_block = DownBlock(d, **kw) if cfg.downsample else None
        self.project_to_hidden_norm = RMSNorm(d, eps=NORM_EPS, param_dtype=param_dtype)
        self.project_to_hidden = Linear(d, d, axes=("embed", "mlp"), use_bias=False, **kw)

        shape = (d, cfg.num_attention_heads, cfg.attention_head_dim, cfg.mlp_ratio, dtype, param_dtype)
        # Eagerly, blocks are built op by op (nothing to compile); under a trace see _new_block_traced.
        traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(nnx.state(rngs)))
        new_block = _new_block_traced if traced else _new_block
        self.transformer_blocks = nnx.List([new_block("dual", *shape, rngs) for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = nnx.List(
            [new_block("single", *shape, rngs) for _ in range(cfg.num_single_layers)])

        self.project_from_hidden_norm = RMSNorm(d, eps=NORM_EPS, param_dtype=param_dtype)
        self.project_from_hidden = Linear(d, d, axes=("mlp", "embed"), use_bias=False, **kw)
        self.up_block = UpBlock(d, **kw) if cfg.downsample else None
        self.mlm_layer = ConvMlmLayer(d, cfg.codebook_size, **kw)

    # ------------------------------------------------------------------ helpers
    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Transformer token grid for a ``height x width`` id grid (halved when down-sampling)."""
        if self.cfg.downsample:
            if height % 2 or width % 2:
                raise ValueError(f"token grid {height}x{width}: both sides must be even (2x down-sampling)")
            return height // 2, width // 2
        return height, width

    def conditioning(self, pooled: jax.Array, micro_conds: jax.Array, timestep: jax.Array) -> jax.Array:
        """``temb [B, D]`` for ``pooled [B, P]``, ``micro_conds [B, 5]`` and ``timestep [B]``.

        The timestep is multiplied by 1000 in float32 (in every activation dtype: bfloat16 would
        round step values such as 3000).
        """
        cond = jnp.concatenate([pooled.astype(jnp.float32), micro_condition_embedding(micro_conds)], axis=-1)
        cond = self.cond_embed(cond.astype(self.dtype))
        return self.time_text_embed(timestep.astype(jnp.float32) * 1000.0, cond)

    def embed_text(self, text_states: jax.Array) -> jax.Array:
        """``[B, L, joint_attention_dim]`` LLM states -> ``[B, L, D]`` text stream."""
        x = text_states.astype(self.dtype)
        if self.connector is not None:
            x = self.connector(x)
        return self.encoder_proj_layer_norm(self.context_embedder(x))

    def embed_image(self, ids: jax.Array) -> jax.Array:
        """``[B, H, W] int32`` ids -> ``[B, h*w, D]`` image stream (row-major over the token grid)."""
        x = self.embed(ids)
        if self.down_block is not None:
            x = self.down_block(x)
        b, h, w, c = x.shape
        return self.project_to_hidden(self.project_to_hidden_norm(x.reshape(b, h * w, c)))

    def head(self, x: jax.Array, height: int, width: int) -> jax.Array:
        """``[B, h*w, D]`` image stream -> logits ``[B, H, W, codebook_size] float32``."""
        x = self.project_from_hidden(self.project_from_hidden_norm(x))
        x = x.reshape(x.shape[0], height, width, x.shape[-1])
        if self.up_block is not None:
            x = self.up_block(x)
        return self.mlm_layer(x).astype(jnp.float32)

    # ------------------------------------------------------------------ forward
    def __call__(self, ids: jax.Array, ref_ids: jax.Array | None, text_states: jax.Array, pooled: jax.Array,
                 micro_conds: jax.Array, timestep: jax.Array, *, reference_strength=1.0,
                 capture_blocks: Sequence[int] = (), capture_mode: str = "official", capture_grad: bool = False,
                 capture_rows: jax.Array | None = None):
        """One forward pass.

        Args:
          ids: ``[B, H, W] int32`` target ids (``mask_token_id`` where unknown).
          ref_ids: ``[B, H, W] int32`` reference (source image) ids, or ``None`` for no reference stream.
          text_states: ``[B, L, joint_attention_dim]`` LLM hidden states (the connector runs here).
          pooled: ``[B, pooled_projection_dim]`` pooled CLIP vector.
          micro_conds: ``[B, 5]`` float ``[width, height, crop_top, crop_left, aesthetic]``.
          timestep: ``[B]`` int or float step value; multiplied by 1000 inside.
          reference_strength: python float or traced scalar ``s``; ``log(s)`` is added to the attention
            logits between reference and non-reference tokens (``s == 1`` adds exactly 0).
          capture_blocks: static global block indices (dual blocks ``0..num_layers-1``, then single
            blocks) whose text-to-image attention is returned.
          capture_mode: ``"official"`` (softmax over text and image keys, no reference keys or bias, as
            the reference records it) or ``"model"`` (the attention used, image columns).
          capture_grad: the scores are differentiable (training the edit-region map with an
            auxiliary loss, ``training.losses.region_attention_loss``); the same values either way.
          capture_rows: ``[B, L]`` weights of the text rows in the scores (default: the mean over all
            rows, as the reference); e.g. 1 on the instruction's words, 0 on padding.
        Returns:
          ``(logits [B, H, W, codebook_size] float32, scores)``, ``scores`` ``None`` without captures,
          else ``[B, len(capture_blocks), h*w] float32``: per captured block the attention of all text
          queries over the image keys, mean over heads and text rows.
        """
        cfg = self.cfg
        capture_blocks = tuple(int(i) for i in capture_blocks)
        bad = [i for i in capture_blocks if not 0 <= i < cfg.num_blocks]
        if bad:
            raise ValueError(f"capture_blocks {bad} out of range: blocks are 0..{cfg.num_blocks - 1}")
        if capture_blocks and capture_mode not in CAPTURE_MODES:
            raise ValueError(f"capture_mode must be one of {CAPTURE_MODES}, got {capture_mode!r}")
        if ref_ids is not None and ref_ids.shape != ids.shape:
            raise ValueError(f"ref_ids {ref_ids.shape} must have the shape of ids {ids.shape}")
        timestep = jnp.asarray(timestep)
        batch = ids.shape[0]
        gh, gw = self.grid_size(ids.shape[1], ids.shape[2])
        has_ref = ref_ids is not None

        txt = self.embed_text(text_states)
        if has_ref:
            # Target and reference share every embedding weight: run them as one batch. The
            # reference stream is conditioned on timestep 0.
            streams = self.embed_image(jnp.concatenate([ids, ref_ids], axis=0))
            img = jnp.concatenate([streams[:batch], streams[batch:]], axis=1)   # [image; reference]
            t = jnp.concatenate([timestep.astype(jnp.float32), jnp.zeros((batch,), jnp.float32)])
            conds = self.conditioning(jnp.concatenate([pooled, pooled]),
                                      jnp.concatenate([micro_conds, micro_conds]), t)
            temb, ref_temb = conds[:batch], conds[batch:]
        else:
            img, ref_temb = self.embed_image(ids), None
            temb = self.conditioning(pooled, micro_conds, timestep)

        seg = Segments(text=txt.shape[1], image=gh * gw, reference=gh * gw if has_ref else 0)
        if not has_ref or (isinstance(reference_strength, (int, float)) and reference_strength == 1.0):
            log_strength = None     # no reference, or a static strength of 1: no bias at all
        else:
            log_strength = jnp.log(jnp.asarray(reference_strength, jnp.float32))
        cos, sin = joint_rope_tables(seg.text, gh, gw, copies=2 if has_ref else 1,
                                     axes_dims=cfg.axes_dims_rope, theta=cfg.rope_theta)
        scores: dict[int, jax.Array] = {}

        def mode(i):
            return capture_mode if i in capture_blocks else None

        # Under parallel.gather_per_block (FSDP), each block gathers its own parameters right before
        # it runs and again in the backward pass, recomputing its forward there (remat implied).
        gather = block_gather()

        def wrap(call):
            if gather is not None:
                return gathered_block_call(call, gather)
            return nnx.remat(call) if self.remat else call

        def dual_call(m):
            def call(block, txt, img, temb, ref_temb, log_strength):
                return block(txt, img, temb, ref_temb, cos, sin, seg=seg, log_strength=log_strength,
                             capture_mode=m, attention_impl=self.attention, capture_grad=capture_grad,
                             capture_rows=capture_rows)
            return wrap(call)

        def single_call(m):
            def call(block, x, temb, ref_temb, log_strength):
                return block(x, temb, ref_temb, cos, sin, seg=seg, log_strength=log_strength,
                             capture_mode=m, attention_impl=self.attention, capture_grad=capture_grad,
                             capture_rows=capture_rows)
            return wrap(call)

        # Named scopes ("dual_block_3", "attention_core", "logits_head", ...) name the compiled ops in
        # profiles (xprof, perfetto, bench.profile).
        scan = self.scan_blocks and gather is None

        def dual_step(block, carry):
            txt, img, _ = dual_call(None)(block, *carry, temb, ref_temb, log_strength)
            return txt, img

        def single_step(block, x):
            return single_call(None)(block, x, temb, ref_temb, log_strength)[0]

        blocks = list(self.transformer_blocks)
        for a, b in _block_runs(blocks, 0, capture_blocks, scan):
            if b - a > 1:
                with jax.named_scope(f"dual_blocks_{a}_{b - 1}"):
                    txt, img = _scan_blocks(blocks[a:b], dual_step, (txt, img))
                continue
            with jax.named_scope(f"dual_block_{a}"):
                txt, img, s = dual_call(mode(a))(blocks[a], txt, img, temb, ref_temb, log_strength)
            if s is not None:
                scores[a] = s
        x = jnp.concatenate([txt, img], axis=1)                                 # [text; image; reference]
        blocks = list(self.single_transformer_blocks)
        for a, b in _block_runs(blocks, cfg.num_layers, capture_blocks, scan):
            if b - a > 1:
                with jax.named_scope(f"single_blocks_{cfg.num_layers + a}_{cfg.num_layers + b - 1}"):
                    x = _scan_blocks(blocks[a:b], single_step, x)
                continue
            i = cfg.num_layers + a
            with jax.named_scope(f"single_block_{i}"):
                x, s = single_call(mode(i))(blocks[a], x, temb, ref_temb, log_strength)
            if s is not None:
                scores[i] = s

        with jax.named_scope("logits_head"):
            logits = self.head(x[:, seg.text: seg.text + seg.image], gh, gw)
        if not capture_blocks:
            return logits, None
        return logits, jnp.stack([scores[i] for i in capture_blocks], axis=1)


def _block_runs(blocks, offset: int, capture_blocks, scan: bool) -> list[tuple[int, int]]:
    """``[a, b)`` index ranges covering ``blocks`` in order: with ``scan``, the maximal runs of blocks
    that capture nothing (global index ``offset + i`` not in ``capture_blocks``) and share one
    structure, each a scanned range; every other block a range of its own."""
    if not scan:
        return [(i, i + 1) for i in range(len(blocks))]
    defs = [nnx.graphdef(b) for b in blocks]
    runs, a = [], 0
    for i in range(1, len(blocks) + 1):
        if (i == len(blocks) or offset + i in capture_blocks or offset + a in capture_blocks
                or defs[i] != defs[a]):
            runs.append((a, i))
            a = i
    return runs


def _scan_blocks(blocks, step, carry):
    """``carry = step(block, carry)`` for each of ``blocks`` (one structure) as one ``jax.lax.scan``
    over their stacked variables."""
    graphdef = nnx.graphdef(blocks[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in blocks])

    def body(c, st):
        return step(nnx.merge(graphdef, st), c), None

    return jax.lax.scan(body, carry, stacked)[0]


def block_kind(cfg: TransformerConfig, index: int) -> tuple[str, int]:
    """``("dual", i)`` or ``("single", i)`` for a global block index."""
    if not 0 <= index < cfg.num_blocks:
        raise ValueError(f"block {index} out of range 0..{cfg.num_blocks - 1}")
    return ("dual", index) if index < cfg.num_layers else ("single", index - cfg.num_layers)


__all__ = ["RELEASED_CONFIG", "TransformerConfig", "EditTransformer", "block_kind"]
