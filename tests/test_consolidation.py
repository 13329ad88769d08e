"""Attention consolidation: fixture parity (case d) and agreement with scipy / PyTorch's formulas."""

import jax
import numpy as np
import pytest
from scipy import ndimage

from editmgt_jax.sampling import consolidation as C
from numpy_reference import scipy_adaptive_smooth, torch_bicubic_direct

# compiled once per shape: op-by-op dispatch of the small filters is slower than compiling them
rescale = jax.jit(C.rescale)
gaussian_blur = jax.jit(C.gaussian_blur)
local_variance = jax.jit(C.local_variance)
adaptive_smooth = jax.jit(C.adaptive_smooth)
percentile_linear = jax.jit(C.percentile_linear, static_argnums=1)
bicubic_resize = jax.jit(C.bicubic_resize, static_argnums=1, static_argnames="scale_factor")
consolidate = jax.jit(C.consolidate, static_argnums=(1, 2))


def tol(ref):
    return 1e-4 * max(1.0, float(np.max(np.abs(ref))))


def max_err(got, ref):
    return float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64))))


# ----------------------------------------------------------------------------- case d fixtures
def test_rescale_matches_fixture(cases):
    got = np.asarray(rescale(cases["d_score_raw"]))
    ref = cases["d_score_rescaled"]
    assert max_err(got, ref) <= tol(ref)
    assert max_err(got, ref) < 1e-6


def test_smooth_matches_fixture(cases):
    ref = cases["d_score_smoothed"]
    got = np.asarray(adaptive_smooth(cases["d_score_rescaled"].reshape(4, 32, 32))).reshape(4, -1)
    assert max_err(got, ref) <= tol(ref)
    assert max_err(got, ref) < 2e-6


def test_upsample_matches_fixture(cases):
    ref = cases["d_score_upsampled"]
    got = np.asarray(bicubic_resize(cases["d_score_smoothed"].reshape(4, 32, 32), (64, 64))).reshape(4, -1)
    assert max_err(got, ref) <= tol(ref)
    assert max_err(got, ref) < 2e-6
    # the same map through the scale-factor form of interpolate
    got2 = np.asarray(bicubic_resize(cases["d_score_smoothed"].reshape(4, 32, 32), scale_factor=2))
    assert max_err(got2.reshape(4, -1), ref) < 2e-6


@pytest.mark.parametrize("source", ["raw", "blocks"])
def test_whole_chain_matches_fixture(cases, source):
    if source == "raw":
        blocks = cases["d_score_raw"][:, None, :]
    else:
        blocks = cases["d_score_blocks"]
    out = consolidate(blocks, (32, 32), (64, 64))
    raw = cases["d_score_raw"]
    assert max_err(out["raw"], raw) <= 1e-4 * np.max(np.abs(raw))  # relative: raw scores are ~1e-2
    for k in ("rescaled", "smoothed", "upsampled"):
        ref = cases[f"d_score_{k}"]
        assert out[k].shape == ref.shape
        assert max_err(out[k], ref) <= tol(ref), k
        assert max_err(out[k], ref) < 2e-6, k


# ----------------------------------------------------------------------------- other grids
@pytest.mark.parametrize("shape", [(16, 16), (8, 12), (5, 5), (3, 7)])
def test_filters_match_scipy(shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.random((3,) + shape).astype(np.float32)
    g = np.asarray(gaussian_blur(x))
    v = np.asarray(local_variance(x))
    for b in range(3):
        assert max_err(g[b], ndimage.gaussian_filter(x[b], sigma=1.5, mode="reflect")) < 1e-6
        assert max_err(v[b], ndimage.generic_filter(x[b], np.var, size=5, mode="reflect")) < 1e-6


@pytest.mark.parametrize("shape", [(16, 16), (8, 12), (5, 5)])
def test_adaptive_smooth_matches_scipy(shape):
    rng = np.random.default_rng(7 + shape[1])
    x = rng.random((3,) + shape).astype(np.float32)
    got = np.asarray(adaptive_smooth(x))
    for b in range(3):
        assert max_err(got[b], scipy_adaptive_smooth(x[b])) < 2e-6


def test_percentile_matches_numpy():
    rng = np.random.default_rng(3)
    for n, q in ((1, 90), (2, 10), (25, 90), (1024, 90), (1024, 50)):
        x = rng.random((4, n)).astype(np.float32)
        if n == 1024:  # repeated values, as a score map can have
            x[:, :300] = 0.0
        got = np.asarray(percentile_linear(x, q))
        ref = np.percentile(x.astype(np.float64), q, axis=-1)
        assert max_err(got, ref) < 1e-6


def test_reflect_index_periodic():
    # grid a b c d, period 8: ... a b c d d c b a | a b c d | d c b a a b c d ...
    got = C.reflect_index(np.arange(-9, 13), 4)
    want = [0, 0, 1, 2, 3, 3, 2, 1, 0, 0, 1, 2, 3, 3, 2, 1, 0, 0, 1, 2, 3, 3]
    assert got.tolist() == want


@pytest.mark.parametrize("src,dst", [((32, 32), (64, 64)), ((5, 7), (15, 14)), ((8, 12), (11, 30)), ((4, 4), (4, 4))])
def test_bicubic_matches_torch_formula(src, dst):
    rng = np.random.default_rng(src[0] * dst[1])
    x = rng.random((3,) + src).astype(np.float32)
    got = np.asarray(bicubic_resize(x, dst))
    for b in range(3):
        assert max_err(got[b], torch_bicubic_direct(x[b], *dst)) < 2e-6
    if src == dst:
        assert max_err(got, x) < 1e-6  # t = 0: the cubic kernel is the identity


def test_bicubic_overshoots_like_torch():
    x = np.zeros((1, 8, 8), np.float32)
    x[0, 4:, :] = 1.0
    up = np.asarray(bicubic_resize(x, (16, 16)))
    assert up.max() > 1.0 and up.min() < 0.0


def test_batch_samples_are_independent():
    rng = np.random.default_rng(11)
    blocks = rng.random((3, 2, 16 * 16)).astype(np.float32) * 0.01
    blocks[2] = 0.005  # a constant map stays finite (and rescales to 0)
    full = jax.tree.map(np.asarray, consolidate(blocks, (16, 16), (32, 32)))
    other = blocks.copy()
    other[0] = rng.random((2, 256)) * 0.01
    changed = jax.tree.map(np.asarray, consolidate(other, (16, 16), (32, 32)))
    for k in full:
        np.testing.assert_array_equal(changed[k][1:], full[k][1:])  # no cross-talk between samples
        assert np.all(np.isfinite(full[k]))
    np.testing.assert_allclose(full["rescaled"][2], 0.0, atol=1e-6)
    np.testing.assert_allclose(full["upsampled"][2], 0.0, atol=1e-6)
    for b in range(2):  # each sample equals the single-image reference
        s = C.rescale(blocks[b].mean(0)).reshape(16, 16)
        want = torch_bicubic_direct(scipy_adaptive_smooth(np.asarray(s)), 32, 32)
        assert max_err(full["upsampled"][b].reshape(32, 32), want) < 2e-6
