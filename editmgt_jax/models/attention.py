"""Attention core of the joint sequence ``[text, image, reference]``.

One function, :func:`attention`, with interchangeable implementations:

``"xla"``
    Blocked attention in plain XLA, the reference and the CPU default. A loop over the ``H`` heads
    (the ``B`` examples batched inside a step, so a mesh that shards examples keeps them sharded;
    each head read from and written back into ``[B, H, S, D]`` in place), and inside each head a
    loop over query blocks against all keys, so one ``[B, block_q, S]`` block of logits exists at a
    time (never ``[B, H, S, S]``). The softmax scale is
    folded into the query block, the reference-strength bias is made inside the block from the
    segment boundaries (two iotas and a compare), softmax statistics are float32 and the
    normalisation happens after the ``P @ V`` product. The captured text-to-image attention comes out
    of the first query block of the same pass (the text rows). The backward pass is a custom VJP that
    recomputes each block's probabilities from the saved log-sum-exp (flash-attention style): it
    stores ``q, k, v``, the output and ``[B, H, S]`` statistics, never ``[B, H, S, S]``.
``"cudnn"``
    ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU).
``"pallas"``
    The Pallas TPU flash-attention kernel (``jax.experimental.pallas.ops.tpu.flash_attention``).
``"naive"``
    Full ``[B, H, S, S]`` logits with a materialised bias: the textbook formula, kept for tests.

The reference-strength bias adds ``log s`` to the logits between a reference token and a
non-reference token (both directions). Kernels without a bias operand get it through one extra
head-dimension channel: with ``q_x = +1`` for non-reference queries, ``-1`` for reference queries
and ``k_x = log(s) / scale`` for reference keys (0 otherwise), ``scale * q_x * k_x`` adds ``+log s``
to the reference keys of a non-reference query and ``-log s`` to the reference keys of a reference
query; the latter differs from the wanted ``+log s`` on the non-reference keys by the constant
``-log s`` over the whole row, which the softmax removes. So the kernels see plain attention with
``head_dim + 1`` channels (zero-padded to the kernel's alignment) and no ``[S, S]`` operand. The
kernels do not expose probabilities: with a capture, the text rows' block of logits ``[B, H, L, S]``
is computed next to the kernel call.

``"cudnn-bf16"``
    ``cudnn`` on float32 inputs cast to bfloat16 (the output cast back): only when asked for
    (``EDITMGT_ATTENTION=cudnn-bf16``), since it rounds what the float32 path keeps.

Selection (:func:`choose`): each implementation declares what it takes (:class:`Requirements`:
backends, input dtypes, the head dim after the bias channel and its padding, sequence multiple,
how it carries the bias), and a call's :class:`Problem` (backend, GPU generation, dtype, head dim,
sequence length, bias) goes to the first implementation of the backend's order that takes it
(``gpu``: ``cudnn``, then ``xla``; ``tpu``: ``pallas``, then ``xla``; otherwise ``xla``).
``EDITMGT_ATTENTION=<name>`` puts ``name`` first. An implementation passed over is reported once
per reason (a warning of the ``editmgt_jax.attention`` logger). So float32 on a GPU runs ``xla``
(cuDNN's fused kernels take fp16/bf16 only), and a head of 128 with the bias channel (136 wide)
runs ``xla`` on GPUs before Hopper (cuDNN takes head dims up to 128 there, 256 from Hopper on).
The ``implementation`` argument of :func:`attention` is used as given (tests run the kernels in
interpret modes on CPU).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from functools import partial

import jax
import jax.numpy as jnp

CAPTURE_MODES = ("official", "model")
IMPLEMENTATIONS = ("xla", "cudnn", "pallas", "naive", "cudnn-bf16")
_BACKEND_DEFAULT = {"cpu": "xla", "gpu": "cudnn", "cuda": "cudnn", "rocm": "xla", "tpu": "pallas"}
ENV_VAR = "EDITMGT_ATTENTION"
# At most this many float32 logits in one block of the xla implementation (16 MiB). The default
# block is the largest power-of-two number of query rows within it: at the medium benchmark shape
# (CFG batch 2, 2304 tokens) 512 rows. On a 2-core CPU (2 MiB L2 per core) 512 and 1024 rows were
# the fastest with both cores (256 rows about 7% slower, forward and gradient); on one core 256 rows
# were about 15% faster than 512 (bench.attention --impls xla/256,xla/512).
BLOCK_ELEMENTS = 4 * 1024 * 1024
PALLAS_SEQ_MULTIPLE = 128


@dataclasses.dataclass(frozen=True)
class Segments:
    """Static lengths of the joint sequence ``[text, image, reference]``."""

    text: int
    image: int
    reference: int = 0

    @property
    def total(self) -> int:
        return self.text + self.image + self.reference

    @property
    def reference_start(self) -> int:
        return self.text + self.image


def default_implementation() -> str:
    """``$EDITMGT_ATTENTION`` if set, else the backend's first choice (before :func:`choose` checks
    that it takes the call)."""
    name = os.environ.get(ENV_VAR)
    if name:
        if name not in IMPLEMENTATIONS:
            raise ValueError(f"{ENV_VAR}={name!r}: use one of {IMPLEMENTATIONS}")
        return name
    return _BACKEND_DEFAULT.get(jax.default_backend(), "xla")


def _check_capture(mode: str | None):
    if mode is not None and mode not in CAPTURE_MODES:
        raise ValueError(f"capture_mode must be one of {CAPTURE_MODES}, got {mode!r}")


# ----------------------------------------------------------------------------- naive
def reference_bias(seg: Segments, log_strength: jax.Array | float | None) -> jax.Array | None:
    """Additive logit bias ``[S, S] float32``: ``log_strength`` between a reference token and a
    non-reference token (both directions), 0 elsewhere. ``None`` when there is nothing to add."""
    if seg.reference == 0 or log_strength is None:
        return None
    is_ref = jnp.arange(seg.total) >= seg.reference_start
    cross = is_ref[:, None] != is_ref[None, :]
    return jnp.where(cross, jnp.asarray(log_strength, jnp.float32), jnp.float32(0.0))


def _naive_logits(q: jax.Array, k: jax.Array) -> jax.Array:
    scale = 1.0 / math.sqrt(q.shape[-1])
    return jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale


def naive_attention(q, k, v, bias=None):
    """``softmax(q k^T / sqrt(D) + bias) v`` with full ``[B, H, Sq, Sk]`` float32 logits."""
    logits = _naive_logits(q, k)
    if bias is not None:
        logits = logits + bias
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(v.dtype)


def naive_capture(q, k, seg: Segments, bias, mode: str) -> jax.Array:
    """Text-to-image attention from full logits, ``[B, seg.image] float32`` (see :func:`attention`)."""
    _check_capture(mode)
    q_text = q[:, :, : seg.text]
    if mode == "official":
        logits = _naive_logits(q_text, k[:, :, : seg.reference_start])
    else:
        logits = _naive_logits(q_text, k)
        if bias is not None:
            logits = logits + bias[: seg.text]
    probs = jax.nn.softmax(logits, axis=-1)[..., seg.text: seg.reference_start]
    return jnp.mean(probs, axis=(1, 2))


def _naive(q, k, v, seg, log_strength, capture_mode):
    bias = reference_bias(seg, log_strength)
    out = naive_attention(q, k, v, bias)
    score = None if capture_mode is None else naive_capture(q, k, seg, bias, capture_mode)
    return out, score


# ----------------------------------------------------------------------------- xla (blocked)
def _plan(seg: Segments, block_q: int | None, capture: bool, batch: int = 1
          ) -> tuple[int, tuple[tuple[int, int], ...]]:
    """``(block_q, spans)``: query rows per block and the row spans ``[a, b)`` blocked separately.
    A block never straddles the start of the reference segment, so the bias of a block is one row
    vector over the keys. The default block is the largest power-of-two number of rows whose logits
    over the ``batch`` examples a loop step computes together fit in :data:`BLOCK_ELEMENTS`. With a
    capture the first block of the first span holds at least the text rows."""
    s = seg.total
    bq = block_q or 1 << (max(1, BLOCK_ELEMENTS // (s * batch)).bit_length() - 1)
    spans = ((0, seg.reference_start), (seg.reference_start, s)) if seg.reference else ((0, s),)
    return min(bq, s), tuple((a, b) for a, b in spans if b > a)


def _row_blocks(seg: Segments, plan, capture: bool):
    """The query blocks of a plan as ``(start, rows, count, ref_rows, first)``: ``count`` blocks of
    ``rows`` rows from ``start``, each all reference or all non-reference rows (``ref_rows``);
    ``first`` marks the capture block (the text rows and more). A span that is not a multiple of the
    block ends with one shorter block, so no row is padded."""
    bq, spans = plan
    out = []
    for a, b in spans:
        ref_rows = a >= seg.reference_start
        if capture and a == 0:
            c = min(max(bq, seg.text), b)
            out.append((0, c, 1, ref_rows, True))
            a = c
        n = (b - a) // bq
        if n:
            out.append((a, bq, n, ref_rows, False))
        if a + n * bq < b:
            out.append((a + n * bq, b - a - n * bq, 1, ref_rows, False))
    return tuple(out)


def _block_logits(qb, k, ref_rows: bool, seg: Segments, ls, scale: float):
    """Float32 logits ``[B, bq, S]`` of a block of query rows ``qb [B, bq, D]`` against ``k [B, S,
    D]`` with the bias added, and the bias pattern ``[S] bool`` of those rows (``None`` without
    bias).

    The rows of a block are all reference or all non-reference (``ref_rows``, :func:`_plan`), so
    the bias is ``log s`` on the keys of the other kind: a row vector broadcast inside the fused add
    (a ``[bq, S]`` bias array would be loop-invariant, and XLA would hoist it out of the loops,
    building the full ``[S, S]`` operand again).
    """
    s = jnp.einsum("bqd,bkd->bqk", (qb * scale).astype(qb.dtype), k, preferred_element_type=jnp.float32)
    if ls is None:
        return s, None
    k_ref = jnp.arange(k.shape[1]) >= seg.reference_start
    cross = ~k_ref if ref_rows else k_ref
    return s + jnp.where(cross, ls, jnp.float32(0.0)), cross


def _block_capture(s, seg: Segments, mode: str) -> jax.Array:
    """``[B, image]`` sum over the text rows of their probabilities on the image keys."""
    if mode == "official":
        # The text rows over [text, image] keys without the bias: for text rows the bias is 0 there.
        s = s[:, : seg.text, : seg.reference_start]
    else:
        s = s[:, : seg.text]
    p = jax.nn.softmax(s, axis=-1)
    return jnp.sum(p[:, :, seg.text: seg.reference_start], axis=1)


def _fwd_block(qb, k, v, ref_rows, ls, seg, scale):
    s, _ = _block_logits(qb, k, ref_rows, seg, ls, scale)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bqk,bkd->bqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32) / l
    return s, o.astype(v.dtype), (m + jnp.log(l))[..., 0]   # normalised after P V


def _rows(x, h, a, n):
    """``x[:, h, a:a + n]`` (``h``, ``a`` may be traced)."""
    return jax.lax.dynamic_slice(x, (0, h, a) + (0,) * (x.ndim - 3), (x.shape[0], 1, n) + x.shape[3:])[:, 0]


def _put(x, h, a, y):
    """``x`` with ``x[:, h, a:a + n] = y``."""
    return jax.lax.dynamic_update_slice(x, y[:, None].astype(x.dtype), (0, h, a) + (0,) * (x.ndim - 3))


def _for_blocks(start, rows, count, fn, carry):
    """``carry = fn(row, carry)`` for the ``count`` blocks of ``rows`` rows from ``start``."""
    if count == 1:
        return fn(start, carry)
    return jax.lax.fori_loop(0, count, lambda i, c: fn(start + i * rows, c), carry)


def _xla_core_fwd(q, k, v, ls, seg, plan, capture_mode):
    """Loop over the heads (``fori_loop``), the examples batched inside each step: a mesh that
    shards the examples keeps them sharded through the loop. (A loop over the flattened ``B * H``
    axis cannot be partitioned over examples: every device gathered the whole batch's ``q, k, v``
    and computed every example's attention.) Heads are read and the outputs written in place in
    the ``[B, H, S, D]`` layout (no heads-first copies); inside a head, one block of query rows at a
    time against all keys."""
    b, nh, s, d = q.shape
    scale = 1.0 / math.sqrt(d)
    ls_ = None if ls is None else jnp.asarray(ls, jnp.float32)
    blocks = _row_blocks(seg, plan, capture_mode is not None)

    def head(h, carry):
        out, lse, cap = carry
        kh, vh = _rows(k, h, 0, s), _rows(v, h, 0, s)
        for start, rows, count, ref_rows, first in blocks:
            def block(a, c, rows=rows, ref_rows=ref_rows, first=first):
                out, lse, cap = c
                sb, o, l = _fwd_block(_rows(q, h, a, rows), kh, vh, ref_rows, ls_, seg, scale)
                if first:
                    # The first block (the text rows and more) also gives the captured attention.
                    cap = _put(cap, h, 0, _block_capture(sb, seg, capture_mode))
                return _put(out, h, a, o), _put(lse, h, a, l), cap

            out, lse, cap = _for_blocks(start, rows, count, block, (out, lse, cap))
        return out, lse, cap

    n_cap = 0 if capture_mode is None else seg.image
    init = (jnp.zeros(q.shape, v.dtype), jnp.zeros((b, nh, s), jnp.float32),
            jnp.zeros((b, nh, n_cap), jnp.float32))
    out, lse, cap = jax.lax.fori_loop(0, nh, head, init)
    cap = jax.lax.stop_gradient(cap)
    return (out, lse, cap), (q, k, v, ls, out, lse)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _xla_core(q, k, v, ls, seg, plan, capture_mode):
    out, _, cap = _xla_core_fwd(q, k, v, ls, seg, plan, capture_mode)[0]
    return out, cap


def _xla_fwd(q, k, v, ls, seg, plan, capture_mode):
    (out, _, cap), res = _xla_core_fwd(q, k, v, ls, seg, plan, capture_mode)
    return (out, cap), res


def _xla_bwd(seg, plan, capture_mode, res, cts):
    """Gradients head by head from the saved ``lse`` and ``delta = sum(do * out, -1)``, each block's
    probabilities recomputed (flash-attention style)."""
    # The captured attention is an observation (stop-gradient): its cotangent is dropped.
    q, k, v, ls, out, lse = res
    do = cts[0].astype(q.dtype)
    b, nh, s, d = q.shape
    scale = 1.0 / math.sqrt(d)
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    ls_ = None if ls is None else jnp.asarray(ls, jnp.float32)
    blocks = _row_blocks(seg, plan, False)

    def head(h, carry):
        dq, dk, dv, dls = carry
        kh, vh = _rows(k, h, 0, s), _rows(v, h, 0, s)
        # dk and dv accumulate transposed, [B, D, S]: XLA's CPU dot for a contraction over the
        # query rows runs about 1.6x faster with that output layout than with [B, S, D].
        acc = (jnp.zeros((b, d, s), jnp.float32), jnp.zeros((b, d, s), jnp.float32), dls, dq)
        for start, rows, count, ref_rows, _ in blocks:
            def block(a, c, rows=rows, ref_rows=ref_rows):
                dkt, dvt, dls, dq = c
                qb, dob = _rows(q, h, a, rows), _rows(do, h, a, rows)
                lseb, deltab = _rows(lse, h, a, rows), _rows(delta, h, a, rows)
                sb, cross = _block_logits(qb, kh, ref_rows, seg, ls_, scale)
                p = jnp.exp(sb - lseb[..., None])
                dvt = dvt + jnp.einsum("bqk,bqd->bdk", p.astype(dob.dtype), dob,
                                       preferred_element_type=jnp.float32)
                dp = jnp.einsum("bqd,bkd->bqk", dob, vh, preferred_element_type=jnp.float32)
                ds = p * (dp - deltab[..., None])
                dqb = jnp.einsum("bqk,bkd->bqd", ds.astype(kh.dtype), kh,
                                 preferred_element_type=jnp.float32) * scale
                dkt = dkt + jnp.einsum("bqk,bqd->bdk", ds.astype(qb.dtype), qb,
                                       preferred_element_type=jnp.float32) * scale
                if cross is not None:
                    dls = dls + jnp.sum(jnp.sum(ds, axis=(0, 1)) * cross)
                return dkt, dvt, dls, _put(dq, h, a, dqb)

            acc = _for_blocks(start, rows, count, block, acc)
        dkt, dvt, dls, dq = acc
        t = lambda x: jnp.swapaxes(x, 1, 2)
        return dq, _put(dk, h, 0, t(dkt)), _put(dv, h, 0, t(dvt)), dls

    init = (jnp.zeros(q.shape, q.dtype), jnp.zeros(k.shape, k.dtype), jnp.zeros(v.shape, v.dtype),
            jnp.float32(0.0))
    dq, dk, dv, dls = jax.lax.fori_loop(0, nh, head, init)
    dls_out = None if ls is None else dls.astype(jnp.asarray(ls).dtype).reshape(jnp.shape(ls))
    return dq, dk, dv, dls_out


_xla_core.defvjp(_xla_fwd, _xla_bwd)


def _xla(q, k, v, seg, log_strength, capture_mode, block_q=None):
    plan = _plan(seg, block_q, capture_mode is not None, q.shape[0])
    ls = None if log_strength is None else jnp.asarray(log_strength, jnp.float32)
    out, cap = _xla_core(q, k, v, ls, seg, plan, capture_mode)
    score = None if capture_mode is None else jnp.mean(cap, axis=1) / seg.text
    return out, score


# ----------------------------------------------------------------------------- kernels
def fold_bias(q, k, v, seg: Segments, log_strength, multiple: int = 8):
    """``q, k, v`` with the reference-strength bias carried by an extra head channel (module doc),
    head dims zero-padded to a multiple of ``multiple``. Without bias only the padding is applied."""
    d = q.shape[-1]
    parts_q, parts_k = [q], [k]
    if log_strength is not None:
        s = q.shape[2]
        is_ref = (jnp.arange(s) >= seg.reference_start)
        qx = jnp.where(is_ref, -1.0, 1.0).astype(q.dtype)
        kx = jnp.where(is_ref, jnp.asarray(log_strength, jnp.float32) * math.sqrt(d), 0.0).astype(k.dtype)
        parts_q.append(jnp.broadcast_to(qx[:, None], q.shape[:-1] + (1,)))
        parts_k.append(jnp.broadcast_to(kx[:, None], k.shape[:-1] + (1,)))
    width = d + len(parts_q) - 1
    pad = -width % multiple
    if pad:
        parts_q.append(jnp.zeros(q.shape[:-1] + (pad,), q.dtype))
        parts_k.append(jnp.zeros(k.shape[:-1] + (pad,), k.dtype))
    full = width + pad
    q2 = jnp.concatenate(parts_q, -1) if len(parts_q) > 1 else q
    k2 = jnp.concatenate(parts_k, -1) if len(parts_k) > 1 else k
    v2 = jnp.pad(v, [(0, 0)] * 3 + [(0, full - d)]) if full != d else v
    return q2, k2, v2


def _text_rows_capture(q, k, seg: Segments, log_strength, mode: str) -> jax.Array:
    """Capture from the text rows' block of logits ``[B, H, L, S]`` (kernel implementations)."""
    return jax.lax.stop_gradient(text_rows_scores(q, k, seg, log_strength, mode))


def text_rows_scores(q, k, seg: Segments, log_strength, mode: str, rows: jax.Array | None = None) -> jax.Array:
    """The captured text-to-image attention ``[B, seg.image] float32``, differentiable: the text rows'
    logits ``[B, H, L, S]`` only (a few rows), softmax, image columns, mean over heads and text rows
    (``rows`` ``[B, L]``: a weighted mean over the text rows instead, e.g. 1 on the instruction's
    words and 0 on padding). What :func:`attention` returns as its score with ``capture_grad=True``
    (the edit-region map an auxiliary loss can train) or with ``capture_rows``."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = jnp.einsum("bhqd,bhkd->bhqk", q[:, :, : seg.text] * scale, k, preferred_element_type=jnp.float32)
    if mode == "official":
        s = s[..., : seg.reference_start]
    elif log_strength is not None:
        s = s + jnp.where(jnp.arange(seg.total) >= seg.reference_start,
                          jnp.asarray(log_strength, jnp.float32), 0.0)
    p = jax.nn.softmax(s, axis=-1)[..., seg.text: seg.reference_start]
    if rows is None:
        return jnp.mean(p, axis=(1, 2))
    w = jnp.asarray(rows, jnp.float32)
    w = w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1e-6)
    return jnp.einsum("bhln,bl->bn", p, w) / p.shape[1]


def _nn_kernel(q, k, v, seg, log_strength, capture_mode, nn_implementation="cudnn"):
    """``jax.nn.dot_product_attention`` with the folded bias (``[B, S, H, D]`` layout)."""
    d = q.shape[-1]
    q2, k2, v2 = fold_bias(q, k, v, seg, log_strength, multiple=8)
    t = lambda x: x.transpose(0, 2, 1, 3)
    out = jax.nn.dot_product_attention(t(q2), t(k2), t(v2), scale=1.0 / math.sqrt(d),
                                       implementation=nn_implementation)
    out = t(out)[..., :d]
    score = None if capture_mode is None else _text_rows_capture(q, k, seg, log_strength, capture_mode)
    return out, score


def _pallas(q, k, v, seg, log_strength, capture_mode):
    from jax.experimental.pallas.ops.tpu.flash_attention import SegmentIds, flash_attention
    b, _, s, d = q.shape
    q2, k2, v2 = fold_bias(q, k, v, seg, log_strength, multiple=8)
    # The kernel tiles the sequence by 128: pad it, and keep the padding out of the real rows with
    # a second segment id.
    pad = -s % PALLAS_SEQ_MULTIPLE
    segment_ids = None
    if pad:
        q2, k2, v2 = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (q2, k2, v2))
        ids = jnp.broadcast_to((jnp.arange(s + pad) >= s).astype(jnp.int32), (b, s + pad))
        segment_ids = SegmentIds(q=ids, kv=ids)
    out = flash_attention(q2, k2, v2, segment_ids=segment_ids, sm_scale=1.0 / math.sqrt(d))
    out = out[:, :, :s, :d]
    score = None if capture_mode is None else _text_rows_capture(q, k, seg, log_strength, capture_mode)
    return out, score


# ----------------------------------------------------------------------------- selection
FOLD_MULTIPLE = 8   # the kernels' head-dim alignment: the bias channel is zero-padded to it
BACKEND_ORDER = {"gpu": ("cudnn", "xla"), "tpu": ("pallas", "xla")}
_log = logging.getLogger("editmgt_jax.attention")
_reported: set = set()


@dataclasses.dataclass(frozen=True)
class Problem:
    """What one attention call asks of an implementation (all static at trace time).

    ``backend``: ``cpu``, ``gpu`` (CUDA), ``rocm`` or ``tpu``; ``compute_capability``: the GPU's
    ``(major, minor)`` (``None`` elsewhere, or unknown: then the older GPUs' limits apply);
    ``dtype``: the name of the inputs' dtype; ``bias``: the reference-strength bias is present."""

    backend: str
    dtype: str
    head_dim: int
    seq: int
    bias: bool = False
    compute_capability: tuple[int, int] | None = None

    @property
    def kernel_head_dim(self) -> int:
        """The head dim a kernel without a bias operand sees: the bias channel added, padded
        (:func:`fold_bias`)."""
        width = self.head_dim + (1 if self.bias else 0)
        return width + (-width % FOLD_MULTIPLE)


def _cudnn_head_max(p: Problem) -> int:
    """cuDNN's fused kernels (fp16/bf16): head dims up to 256 from Hopper (9.0) on, else 128."""
    return 256 if (p.compute_capability or (0, 0)) >= (9, 0) else 128


@dataclasses.dataclass(frozen=True)
class Requirements:
    """What an implementation takes.

    ``backends`` / ``dtypes``: ``None`` is any. ``cast``: input dtypes it runs after a cast to
    ``cast_to``. ``bias``: ``"segments"`` (made inside the kernel from the segment boundaries),
    ``"channel"`` (one extra head channel, :func:`fold_bias`: the head dim grows) or ``"dense"``
    (a materialised ``[S, S]`` operand). ``head_max``: the largest head dim the kernel sees (a
    function of the problem: it can depend on the GPU generation). ``seq_multiple``: sequence
    lengths it takes without padding; ``pads``: it pads other lengths itself."""

    name: str
    backends: tuple[str, ...] | None = None
    dtypes: tuple[str, ...] | None = None
    cast: tuple[str, ...] = ()
    cast_to: str | None = None
    bias: str = "segments"
    head_multiple: int = 1
    head_max: object = None
    seq_multiple: int = 1
    pads: bool = False

    def rejects(self, p: Problem) -> str | None:
        """Why this implementation cannot run ``p``, or ``None`` when it can."""
        if self.backends is not None and p.backend not in self.backends:
            return f"runs on {'/'.join(self.backends)}, not {p.backend}"
        if self.dtypes is not None and p.dtype not in self.dtypes and p.dtype not in self.cast:
            ask = f" (EDITMGT_ATTENTION={self.name}-bf16 casts)" if f"{self.name}-bf16" in REQUIREMENTS else ""
            return f"takes {'/'.join(self.dtypes)} inputs, not {p.dtype}{ask}"
        d = p.kernel_head_dim if self.bias == "channel" else p.head_dim
        what = "with the bias channel and padding " if self.bias == "channel" and d != p.head_dim else ""
        limit = None if self.head_max is None else self.head_max(p)
        if limit is not None and d > limit:
            gen = "" if p.compute_capability is None else f" on compute capability {p.compute_capability[0]}.{p.compute_capability[1]}"
            return f"takes head dims up to {limit}{gen}; head dim {p.head_dim} is {what}{d}"
        if d % self.head_multiple:
            return f"takes head dims that are multiples of {self.head_multiple}, not {d}"
        if not self.pads and p.seq % self.seq_multiple:
            return f"takes sequence lengths that are multiples of {self.seq_multiple}, not {p.seq}"
        return None


_HALF = ("bfloat16", "float16")
REQUIREMENTS = {r.name: r for r in (
    Requirements("xla", bias="segments"),
    Requirements("naive", bias="dense"),
    Requirements("cudnn", backends=("gpu",), dtypes=_HALF, bias="channel", head_multiple=8,
                 head_max=_cudnn_head_max),
    Requirements("cudnn-bf16", backends=("gpu",), dtypes=_HALF, cast=("float32",), cast_to="bfloat16",
                 bias="channel", head_multiple=8, head_max=_cudnn_head_max),
    Requirements("pallas", backends=("tpu",), dtypes=("float32",) + _HALF, bias="channel",
                 seq_multiple=PALLAS_SEQ_MULTIPLE, pads=True),
)}


@dataclasses.dataclass(frozen=True)
class Choice:
    """The implementation picked for a problem, and why each one before it was passed over."""

    name: str
    passed_over: tuple[tuple[str, str], ...] = ()

    @property
    def reason(self) -> str:
        return "; ".join(f"{n} {why}" for n, why in self.passed_over)


def candidates(backend: str, requested: str | None = None) -> tuple[str, ...]:
    """The order tried for ``backend``, with ``requested`` (``$EDITMGT_ATTENTION``) first."""
    order = BACKEND_ORDER.get(backend, ("xla",))
    if requested:
        if requested not in IMPLEMENTATIONS:
            raise ValueError(f"{ENV_VAR}={requested!r}: use one of {IMPLEMENTATIONS}")
        order = (requested,) + tuple(n for n in order if n != requested)
    return order


def choose(problem: Problem, requested: str | None = None, *, report: bool = True) -> Choice:
    """The first implementation of :func:`candidates` that takes ``problem``. With ``report``,
    each implementation passed over is said once per reason (logger ``editmgt_jax.attention``)."""
    passed = []
    for name in candidates(problem.backend, requested):
        why = REQUIREMENTS[name].rejects(problem)
        if why is None:
            choice = Choice(name, tuple(passed))
            break
        passed.append((name, why))
    else:   # xla takes everything: unreachable unless the order lacks it
        choice = Choice("xla", tuple(passed))
    if report:
        for name, why in choice.passed_over:
            if (name, why) not in _reported:
                _reported.add((name, why))
                _log.warning("attention: %s %s; using %s", name, why, choice.name)
    return choice


def device_facts() -> tuple[str, tuple[int, int] | None]:
    """``(backend, compute_capability)`` of the default device (``rocm`` for AMD GPUs)."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend, None
    dev = jax.devices()[0]
    if "rocm" in str(getattr(dev.client, "platform_version", "")).lower():
        return "rocm", None
    cc = getattr(dev, "compute_capability", None)
    try:
        return backend, tuple(int(x) for x in str(cc).split(".")[:2])
    except ValueError:
        return backend, None


def problem_of(q: jax.Array, seg: Segments, log_strength, *, backend: str | None = None,
               compute_capability: tuple[int, int] | None = None) -> Problem:
    """The :class:`Problem` of ``attention(q, ..., seg, log_strength)`` on this (or the given) device."""
    if backend is None:
        backend, compute_capability = device_facts()
    return Problem(backend=backend, dtype=jnp.dtype(q.dtype).name, head_dim=int(q.shape[-1]),
                   seq=int(q.shape[2]), bias=seg.reference > 0 and log_strength is not None,
                   compute_capability=compute_capability)


def _cudnn_bf16(q, k, v, seg, log_strength, capture_mode, nn_implementation="cudnn"):
    """``cudnn`` on inputs cast to bfloat16, the output in the inputs' dtype (the capture from the
    uncast text rows)."""
    dt = q.dtype
    c = lambda x: x.astype(jnp.bfloat16)
    out, _ = _nn_kernel(c(q), c(k), c(v), seg, log_strength, None, nn_implementation)
    score = None if capture_mode is None else _text_rows_capture(q, k, seg, log_strength, capture_mode)
    return out.astype(dt), score


# ----------------------------------------------------------------------------- entry point
def attention(q: jax.Array, k: jax.Array, v: jax.Array, seg: Segments,
              log_strength: jax.Array | float | None = None, *, capture_mode: str | None = None,
              implementation: str | None = None, block_q: int | None = None, capture_grad: bool = False,
              capture_rows: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
    """Softmax attention over the joint sequence with the reference-strength bias.

    Args:
      q, k, v: ``[B, H, S, D]`` with ``S = seg.total`` (RoPE applied), one dtype.
      log_strength: ``log s`` added between reference and non-reference tokens, or ``None`` (no
        bias; also when ``seg.reference == 0``). A python float or traced float32 scalar.
      capture_mode: ``None``, ``"official"`` (the text rows' softmax over ``[text, image]`` keys
        without the bias, as the reference implementation records it) or ``"model"`` (the text rows
        of the attention actually used, image columns).
      implementation: one of :data:`IMPLEMENTATIONS`, used as given; default :func:`choose`'s pick
        for this call on this device.
      block_q: query rows per block (``xla``), default from :data:`BLOCK_ELEMENTS`.
      capture_grad: the score is differentiable (:func:`text_rows_scores`, from the text rows' logits
        alone, whatever the implementation); for training the map with an auxiliary loss.
      capture_rows: ``[B, seg.text]`` weights of the text rows in the captured score (default: the
        mean over all rows, as the reference); e.g. the instruction's words without the padding.
    Returns:
      ``(out [B, H, S, D] in v.dtype, score)``; ``score`` is ``[B, seg.image] float32`` (mean over
      heads and text rows; differentiated only with ``capture_grad``) when ``capture_mode`` is set, else ``None``.
    """
    _check_capture(capture_mode)
    if q.shape[2] != seg.total:
        raise ValueError(f"attention: sequence length {q.shape[2]} != segments total {seg.total}")
    if seg.reference == 0:
        log_strength = None
    if (capture_grad or capture_rows is not None) and capture_mode is not None:
        if capture_rows is not None and tuple(capture_rows.shape) != (q.shape[0], seg.text):
            raise ValueError(f"capture_rows {tuple(capture_rows.shape)} do not fit the batch {q.shape[0]} x "
                             f"{seg.text} text rows")
        out, _ = attention(q, k, v, seg, log_strength, implementation=implementation, block_q=block_q)
        score = text_rows_scores(q, k, seg, log_strength, capture_mode, capture_rows)
        return out, score if capture_grad else jax.lax.stop_gradient(score)
    impl = implementation or choose(problem_of(q, seg, log_strength), os.environ.get(ENV_VAR) or None).name
    if impl == "xla":
        return _xla(q, k, v, seg, log_strength, capture_mode, block_q)
    if impl == "naive":
        return _naive(q, k, v, seg, log_strength, capture_mode)
    if impl == "cudnn":
        return _nn_kernel(q, k, v, seg, log_strength, capture_mode, "cudnn")
    if impl == "pallas":
        return _pallas(q, k, v, seg, log_strength, capture_mode)
    if impl == "cudnn-bf16":
        return _cudnn_bf16(q, k, v, seg, log_strength, capture_mode)
    raise ValueError(f"attention implementation {impl!r}: use one of {IMPLEMENTATIONS}")


__all__ = ["CAPTURE_MODES", "IMPLEMENTATIONS", "REQUIREMENTS", "Choice", "Problem", "Requirements",
           "Segments", "attention", "choose", "default_implementation",
           "fold_bias", "naive_attention", "naive_capture", "reference_bias", "text_rows_scores"]
