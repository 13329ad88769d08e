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
# ----------------------------------------------------------------------------- selection by constraint
def _p(backend="gpu", dtype="bfloat16", head_dim=64, seq=1000, bias=True, cc=(9, 0)):
    return att.Problem(backend=backend, dtype=dtype, head_dim=head_dim, seq=seq, bias=bias,
                       compute_capability=cc if backend == "gpu" else None)


# (problem, $EDITMGT_ATTENTION, picked, words of the reason for what was passed over; "" for none)
CHOICES = [
    (_p("cpu", "float32"), None, "xla", ""),
    (_p("cpu", "bfloat16"), None, "xla", ""),
    (_p("cpu", "float32"), "cudnn", "xla", "runs on gpu, not cpu"),
    (_p("cpu", "float32"), "naive", "naive", ""),
    (_p("rocm", "bfloat16"), None, "xla", ""),
    (_p("tpu", "float32", seq=1000), None, "pallas", ""),            # pads the sequence itself
    (_p("tpu", "bfloat16", head_dim=128), None, "pallas", ""),
    # float32 on a GPU: cuDNN's fused kernels take half precision only; no silent cast
    (_p("gpu", "float32"), None, "xla", "takes bfloat16/float16 inputs, not float32"),
    (_p("gpu", "float32"), "cudnn", "xla", "EDITMGT_ATTENTION=cudnn-bf16 casts"),
    (_p("gpu", "float32"), "cudnn-bf16", "cudnn-bf16", ""),
    (_p("gpu", "bfloat16"), None, "cudnn", ""),
    (_p("gpu", "float16", head_dim=72), None, "cudnn", ""),
    # the release head (128) with the bias channel is 136 wide: cuDNN takes it from Hopper on only
    (_p("gpu", "bfloat16", head_dim=128, cc=(8, 0)), None, "xla",
     "takes head dims up to 128 on compute capability 8.0; head dim 128 is with the bias channel and padding 136"),
    (_p("gpu", "bfloat16", head_dim=128, cc=(9, 0)), None, "cudnn", ""),
    (_p("gpu", "bfloat16", head_dim=128, cc=(10, 0)), None, "cudnn", ""),
    (_p("gpu", "bfloat16", head_dim=128, bias=False, cc=(8, 6)), None, "cudnn", ""),
    (_p("gpu", "bfloat16", head_dim=128, cc=None), None, "xla", "takes head dims up to 128;"),
    (_p("gpu", "float32", head_dim=128, cc=(8, 0)), "cudnn-bf16", "xla", "cudnn-bf16 takes head dims up to 128"),
    (_p("gpu", "float32", head_dim=128, cc=(9, 0)), "cudnn-bf16", "cudnn-bf16", ""),
    (_p("gpu", "bfloat16", head_dim=256, bias=False), None, "cudnn", ""),
    (_p("gpu", "bfloat16", head_dim=256, bias=True), None, "xla", "is with the bias channel and padding 264"),
    (_p("gpu", "bfloat16"), "naive", "naive", ""),
    (_p("gpu", "bfloat16"), "pallas", "cudnn", "pallas runs on tpu, not gpu"),
]


@pytest.mark.parametrize("problem,requested,picked,why", CHOICES)
def test_chooser_picks_the_first_that_fits(problem, requested, picked, why):
    choice = att.choose(problem, requested, report=False)
    assert choice.name == picked, choice
    assert (choice.reason == "") == (why == ""), choice.reason
    assert why in choice.reason
    # what was passed over really rejects the problem, and the pick takes it
    assert att.REQUIREMENTS[picked].rejects(problem) is None
    for name, reason in choice.passed_over:
        assert att.REQUIREMENTS[name].rejects(problem) == reason


def test_folded_head_dim_is_what_the_kernels_see():
    """Problem.kernel_head_dim is the width fold_bias gives the kernels (bias channel, padding)."""
    for d, bias in ((8, True), (8, False), (60, False), (64, True), (128, True), (128, False)):
        seg = Segments(text=2, image=3, reference=3 if bias else 0)
        x = jnp.zeros((1, 1, seg.total, d))
        q2, k2, v2 = att.fold_bias(x, x, x, seg, 0.5 if bias else None, multiple=att.FOLD_MULTIPLE)
        p = att.Problem("gpu", "bfloat16", d, seg.total, bias)
        assert q2.shape[-1] == k2.shape[-1] == v2.shape[-1] == p.kernel_head_dim, (d, bias)


def test_fallback_is_said_once(caplog, monkeypatch):
    monkeypatch.setattr(att, "_reported", set())
    with caplog.at_level("WARNING", logger="editmgt_jax.attention"):
        for _ in range(3):
            assert att.choose(_p("gpu", "float32", head_dim=40)).name == "xla"
        att.choose(_p("gpu", "bfloat16", head_dim=40))   # fits: nothing to say
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "cudnn takes bfloat16/float16 inputs, not float32" in lines[0], lines
    assert lines[0].endswith("using xla")


def test_attention_falls_back_on_this_host(caplog, monkeypatch):
    """EDITMGT_ATTENTION=cudnn on a CPU host: the call runs xla (same numbers) and says why; a bad
    name is an error naming the variable."""
    monkeypatch.setattr(att, "_reported", set())
    q, k, v, _ = _inputs()
    ref, _ = attention(q, k, v, SEG, jnp.float32(0.3), implementation="xla")
    monkeypatch.setenv(att.ENV_VAR, "cudnn")
    with caplog.at_level("WARNING", logger="editmgt_jax.attention"):
        out, _ = attention(q, k, v, SEG, jnp.float32(0.3))
    np.testing.assert_array_equal(out, ref)
    assert any("cudnn runs on gpu" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv(att.ENV_VAR, "flash")
    with pytest.raises(ValueError, match="EDITMGT_ATTENTION='flash'"):
        attention(q, k, v, SEG, jnp.float32(0.3))


def test_cudnn_bf16_cast_path():
    """The cast path (run here through jax.nn's XLA implementation): float32 in, float32 out,
    bf16-close to the full-logits formula, the capture from the uncast rows."""
    q, k, v, _ = _inputs(4)
    ls = jnp.float32(math.log(1.3))
    out, score = att._cudnn_bf16(q, k, v, SEG, ls, "official", nn_implementation="xla")
    ref, ref_score = _naive(q, k, v, ls, "official")
    assert out.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(out - ref)))
    assert 1e-5 < err < 3e-2, err     # rounded (not the float32 path), but only by bf16
    np.testing.assert_allclose(score, ref_score, atol=1e-6)
