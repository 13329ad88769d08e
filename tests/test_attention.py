"""Attention core: every implementation runnable on this host against the full-logits formula (values
and gradients, with and without the reference-strength bias and the capture), memory structure of the
blocked implementation, implementation selection."""

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from editmgt_jax.models import attention as att
from editmgt_jax.models.attention import Segments, attention

SEG = Segments(text=5, image=12, reference=12)
B, H, D = 2, 3, 8


def _inputs(seed=0, seg=SEG):
    ks = jax.random.split(jax.random.key(seed), 4)
    q, k, v, w = (jax.random.normal(kk, (B, H, seg.total, D), jnp.float32) for kk in ks)
    return q, k, v, w


def _pallas_interpret():
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.force_tpu_interpret_mode()


# name -> (keyword arguments of attention, context). "cudnn-fold" runs the cudnn wrapper (bias folded
# into an extra head channel) through jax.nn.dot_product_attention's XLA implementation, which is
# what can run here; "pallas" runs the TPU flash kernel in Pallas interpret mode.
IMPLS = {
    "xla": (dict(implementation="xla"), contextlib.nullcontext),
    "xla-blocks": (dict(implementation="xla", block_q=7), contextlib.nullcontext),
    "cudnn-fold": (None, contextlib.nullcontext),
    "pallas": (dict(implementation="pallas"), _pallas_interpret),
}


def _run(name, q, k, v, ls, mode, seg=SEG):
    kw, _ = IMPLS[name]
    if kw is None:
        return att._nn_kernel(q, k, v, seg, ls, mode, "xla")
    return attention(q, k, v, seg, ls, capture_mode=mode, **kw)


def _naive(q, k, v, ls, mode, seg=SEG):
    return attention(q, k, v, seg, ls, capture_mode=mode, implementation="naive")


CASES = [(None, None), (None, "official"), (math.log(1.3), None), (math.log(1.3), "official"),
         (math.log(0.7), "model")]


@pytest.mark.parametrize("name", [n for n in IMPLS if n != "pallas"])
@pytest.mark.parametrize("ls,mode", CASES)
def test_values_and_gradients_match_full_logits(name, ls, mode):
    with jax.default_matmul_precision("highest"):
        q, k, v, w = _inputs()
        ls_arr = None if ls is None else jnp.float32(ls)
        out, score = _run(name, q, k, v, ls_arr, mode)
        ref_out, ref_score = _naive(q, k, v, ls_arr, mode)
        np.testing.assert_allclose(out, ref_out, atol=2e-6)
        if mode is None:
            assert score is None and ref_score is None
        else:
            assert score.shape == (B, SEG.image)
            np.testing.assert_allclose(score, ref_score, atol=1e-7)

        argnums = (0, 1, 2) if ls is None else (0, 1, 2, 3)

        def loss(fn):
            return lambda q, k, v, ls: jnp.sum(fn(q, k, v, ls, mode)[0] * w)

        grads = jax.grad(loss(lambda *a: _run(name, *a)), argnums)(q, k, v, ls_arr)
        ref_grads = jax.grad(loss(_naive), argnums)(q, k, v, ls_arr)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, atol=1e-5 * max(1.0, float(jnp.abs(r).max())))


@pytest.mark.slow
@pytest.mark.parametrize("ls,mode", [(math.log(1.3), "model"), (None, None)])
def test_pallas_flash_interpret_matches_full_logits(ls, mode):
    """The TPU kernel path (padding to 128 rows, bias folded into a channel) in interpret mode."""
    with jax.default_matmul_precision("highest"), _pallas_interpret():
        q, k, v, w = _inputs(1)
        ls_arr = None if ls is None else jnp.float32(ls)
        out, score = _run("pallas", q, k, v, ls_arr, mode)
        ref_out, ref_score = _naive(q, k, v, ls_arr, mode)
        np.testing.assert_allclose(out, ref_out, atol=1e-5)
        if mode is not None:
            np.testing.assert_allclose(score, ref_score, atol=1e-7)
        g = jax.grad(lambda q: jnp.sum(_run("pallas", q, k, v, ls_arr, None)[0] * w))(q)
        r = jax.grad(lambda q: jnp.sum(_naive(q, k, v, ls_arr, None)[0] * w))(q)
        np.testing.assert_allclose(g, r, atol=1e-4)


def test_bias_is_only_between_reference_and_the_rest():
    """Folding the bias into a channel equals the materialised [S, S] bias for any strength, and a
    strength of 1 (log 0) is no bias at all."""
    q, k, v, _ = _inputs(2)
    with jax.default_matmul_precision("highest"):
        a, _ = attention(q, k, v, SEG, jnp.float32(0.0), implementation="xla")
        b, _ = attention(q, k, v, SEG, None, implementation="xla")
        np.testing.assert_allclose(a, b, atol=1e-7)
        # Without a reference segment a strength is ignored.
        seg = Segments(text=5, image=24)
        c, _ = attention(q, k, v, seg, jnp.float32(0.5), implementation="xla")
        d, _ = attention(q, k, v, seg, None, implementation="naive")
        np.testing.assert_allclose(c, d, atol=2e-6)
        # A huge strength: reference queries see only the non-reference keys (and vice versa).
        e, _ = attention(q, k, v, SEG, jnp.float32(30.0), implementation="xla")
        r = SEG.reference_start
        only_other = att.naive_attention(q[:, :, r:], k[:, :, :r], v[:, :, :r])
        np.testing.assert_allclose(e[:, :, r:], only_other, atol=1e-5)  # logits offset by 30


def test_backward_stores_no_square_logits():
    """The VJP residuals of the blocked implementation are O(S): no [B, H, S, S] array."""
    seg = Segments(text=16, image=64, reference=64)
    q, k, v, _ = _inputs(3, seg)
    for impl, square in (("xla", False), ("naive", True)):
        _, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, seg, jnp.float32(0.1), implementation=impl)[0],
                         q, k, v)
        biggest = max(x.size for x in jax.tree.leaves(vjp))
        assert (biggest >= B * H * seg.total ** 2) == square, (impl, biggest)


def test_forward_temp_memory_is_one_block():
    """Compiled forward: temporaries stay far below the [B, H, S, S] float32 logits."""
    seg = Segments(text=64, image=480, reference=480)
    shape = jax.ShapeDtypeStruct((1, 2, seg.total, 16), jnp.float32)

    def fwd(impl):
        f = jax.jit(lambda q, k, v: attention(q, k, v, seg, jnp.float32(0.1), capture_mode="official",
                                              implementation=impl, block_q=128))
        return f.lower(shape, shape, shape).compile().memory_analysis().temp_size_in_bytes

    square = 2 * seg.total ** 2 * 4
    assert fwd("naive") >= square
    assert fwd("xla") < square / 4


def test_implementation_selection(monkeypatch):
    monkeypatch.delenv(att.ENV_VAR, raising=False)
    assert att.default_implementation() == {"cpu": "xla", "gpu": "cudnn", "tpu": "pallas"}.get(
        jax.default_backend(), "xla")
    monkeypatch.setenv(att.ENV_VAR, "naive")
    assert att.default_implementation() == "naive"
    monkeypatch.setenv(att.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="EDITMGT_ATTENTION"):
        att.default_implementation()
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match="implementation"):
        attention(q, k, v, SEG, implementation="bogus")
    with pytest.raises(ValueError, match="capture_mode"):
        attention(q, k, v, SEG, capture_mode="bogus", implementation="xla")


def test_capture_rows_weigh_the_text_rows_and_capture_grad_differentiates():
    """The capture with text-row weights: all ones = the reference mean (what every implementation
    returns); a one-hot weight = that row's own attention; with capture_grad the score has a gradient
    (the region loss trains it) and the same values."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from editmgt_jax.models.attention import Segments, attention, naive_capture, text_rows_scores

    seg = Segments(text=3, image=4, reference=4)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 2, seg.total, 8)), jnp.float32) for _ in range(3))
    ref = naive_capture(q, k, seg, None, "official")
    ones = jnp.ones((2, seg.text))
    np.testing.assert_allclose(text_rows_scores(q, k, seg, None, "official", ones), ref, rtol=1e-5, atol=1e-7)
    _, with_rows = attention(q, k, v, seg, capture_mode="official", implementation="xla", capture_rows=ones)
    np.testing.assert_allclose(with_rows, ref, rtol=1e-5, atol=1e-7)
    onehot = jnp.zeros((2, seg.text)).at[:, 1].set(1.0)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q[:, :, 1:2], k[:, :, : seg.reference_start]) / np.sqrt(8)
    row1 = jnp.mean(jax.nn.softmax(logits, -1)[..., seg.text:], axis=(1, 2))
    np.testing.assert_allclose(text_rows_scores(q, k, seg, None, "official", onehot), row1, rtol=1e-5, atol=1e-7)
    assert not np.allclose(row1, ref)

    def total(q, grad):
        _, s = attention(q, k, v, seg, capture_mode="official", implementation="xla", capture_grad=grad)
        return jnp.sum(s[:, 0])
    assert float(jnp.abs(jax.grad(total)(q, True)).sum()) > 0
    assert float(jnp.abs(jax.grad(total)(q, False)).sum()) == 0     # an observation without it
    np.testing.assert_allclose(total(q, True), total(q, False), rtol=1e-6)
