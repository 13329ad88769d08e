"""Multi-layer attention consolidation: from captured text-to-image attention to an edit-region map.

The captured attention of a few transformer blocks (one score per image token and block) is averaged,
min-max normalised, smoothed on the token grid and upsampled to the id grid, where it is compared with
the region-hold threshold. Every step follows the reference post-processing (scipy ``gaussian_filter``
and ``generic_filter(np.var)`` in mode 'reflect', numpy ``percentile``, PyTorch bicubic
``interpolate``) to float32 rounding, but batched and for any grid size.

Filters with reflected borders are linear maps with a static structure, so they are built once in
numpy (index arrays and folded weight matrices) and applied as small matmuls / gathers in the graph.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_HI = jax.lax.Precision.HIGHEST  # the filters are float32 parity code: no reduced-precision passes


# ----------------------------------------------------------------------------- static structure
def reflect_index(index: np.ndarray, n: int) -> np.ndarray:
    """Map any integer index onto ``[0, n)`` by half-sample symmetric reflection (scipy 'reflect').

    The extension is periodic with period ``2n``: ``... b a | a b c d | d c b a | a b ...``, so indices
    more than ``n`` outside the grid (small grids, wide filters) reflect again, as scipy does.
    """
    m = np.mod(np.asarray(index), 2 * n)
    return np.where(m >= n, 2 * n - 1 - m, m)


def _folded_filter_matrix(n: int, weights: np.ndarray) -> np.ndarray:
    """``[n, n]`` matrix of a centred 1-D correlation with reflected borders: ``out = A @ in``.

    ``weights`` has odd length ``2r+1`` (tap ``k`` reads ``in[i + k - r]``); taps that reflect onto
    the same input sample are summed (in float64, before the cast to float32).
    """
    r = (len(weights) - 1) // 2
    rows = np.repeat(np.arange(n), len(weights))
    cols = reflect_index(np.arange(n)[:, None] + np.arange(-r, r + 1)[None, :], n).reshape(-1)
    a = np.zeros((n, n), np.float64)
    np.add.at(a, (rows, cols), np.tile(np.asarray(weights, np.float64), n))
    return a.astype(np.float32)


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy's 1-D Gaussian: radius ``int(truncate * sigma + 0.5)``, normalised, ``[2r+1] float64``."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (float(sigma) * float(sigma)) * x**2)
    return phi / phi.sum()


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
    """PyTorch's cubic-convolution coefficients for fractions ``t`` ([n] float32) -> ``[n, 4]``."""
    a = np.float32(a)
    one = np.float32(1)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + one

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + one), near(t), near(one - t), far((one - t) + one)], axis=-1).astype(np.float32)


def bicubic_matrix(n_in: int, n_out: int, scale: float | None = None, a: float = -0.75) -> np.ndarray:
    """``[n_out, n_in] float32`` PyTorch bicubic interpolation along one axis (align_corners=False).

    Source coordinate ``(x + 0.5) * s - 0.5`` in float32 with ``s = n_in / n_out`` (or ``1/scale`` when
    a scale factor is given, as ``F.interpolate(scale_factor=...)`` passes it), NOT clamped at 0; base
    index ``floor``, fraction ``t``; the four neighbours ``base-1 .. base+2`` are clamped to the grid
    (border samples repeat, their weights add up). No antialiasing.
    """
    if scale is not None and scale > 0:
        s = np.float32(1.0 / float(scale))
    else:
        s = np.float32(n_in) / np.float32(n_out)
    dst = np.arange(n_out, dtype=np.float32)
    src = s * (dst + np.float32(0.5)) - np.float32(0.5)
    base = np.floor(src)
    t = (src - base).astype(np.float32)
    w = _cubic_weights(t, a)
    idx = np.clip(base.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.repeat(np.arange(n_out), 4), idx.reshape(-1)), w.reshape(-1))
    return m


# ----------------------------------------------------------------------------- graph functions
def rescale(scores: jax.Array, axis=-1) -> jax.Array:
    """Min-max normalisation ``(s - min) / (max - min + 1e-8)`` along ``axis`` (float32).

    The 1e-8 is kept: raw attention scores are ~1e-2, so it shifts the result at the 1e-6 level.
    """
    s = jnp.asarray(scores, jnp.float32)
    lo = jnp.min(s, axis=axis, keepdims=True)
    hi = jnp.max(s, axis=axis, keepdims=True)
    return (s - lo) / (hi - lo + jnp.float32(1e-8))


def gaussian_blur(grid: jax.Array, sigma: float = 1.5, truncate: float = 4.0) -> jax.Array:
    """``scipy.ndimage.gaussian_filter(x, sigma, mode='reflect', truncate)`` per image.

    Args:
      grid: ``[B, h, w] float32``, any ``h, w >= 1``.
    Returns:
      ``[B, h, w] float32``. Separable: rows (axis ``h``) first, float32 intermediate, then columns.
    """
    g = jnp.asarray(grid, jnp.float32)
    _, h, w = g.shape
    k = gaussian_kernel(sigma, truncate)
    a_h = jnp.asarray(_folded_filter_matrix(h, k))
    a_w = jnp.asarray(_folded_filter_matrix(w, k))
    g = jnp.einsum("ij,bjx->bix", a_h, g, precision=_HI)
    return jnp.einsum("bij,xj->bix", g, a_w, precision=_HI)


def local_variance(grid: jax.Array, size: int = 5) -> jax.Array:
    """Population variance of each ``size x size`` neighbourhood, reflected borders.

    Equals ``scipy.ndimage.generic_filter(x, np.var, size=size, mode='reflect')``; two-pass (mean, then
    mean squared deviation) so float32 keeps the precision of small variances.

    Args:
      grid: ``[B, h, w] float32``.
    Returns:
      ``[B, h, w] float32``.
    """
    g = jnp.asarray(grid, jnp.float32)
    _, h, w = g.shape
    offsets = np.arange(size) - size // 2  # scipy's footprint centre is element size // 2
    rows = reflect_index(np.arange(h)[:, None] + offsets[None, :], h)  # [h, size]
    cols = reflect_index(np.arange(w)[:, None] + offsets[None, :], w)  # [w, size]
    nb = g[:, rows][:, :, :, cols]  # [B, h, size, w, size]
    mean = jnp.mean(nb, axis=(2, 4), keepdims=True)
    return jnp.mean(jnp.square(nb - mean), axis=(2, 4))


def percentile_linear(x: jax.Array, q: float) -> jax.Array:
    """``np.percentile(x, q)`` (method 'linear') over the last axis, in float32.

    Index arithmetic is static (numpy's float64 virtual index); the interpolation follows numpy's
    ``_lerp`` (from the upper neighbour when the fraction is >= 0.5).

    Args:
      x: ``[..., n] float32``.
    Returns:
      ``[...] float32``.
    """
    n = x.shape[-1]
    qf = float(q) / 100.0
    virtual = n * qf + (1.0 + qf * (1.0 - 1.0 - 1.0)) - 1.0  # numpy's (alpha, beta) = (1, 1)
    below = int(min(max(math.floor(virtual), 0), n - 1))
    above = min(below + 1, n - 1)
    gamma = virtual - math.floor(virtual)
    xs = jnp.sort(jnp.asarray(x, jnp.float32), axis=-1)
    a, b = xs[..., below], xs[..., above]
    diff = b - a
    if gamma >= 0.5:
        return b - diff * jnp.float32(1.0 - gamma)
    return a + diff * jnp.float32(gamma)


def adaptive_smooth(grid: jax.Array, *, sigma: float = 1.5, var_size: int = 5, var_weight: float = 0.7,
                    peak_percentile: float = 90.0, peak_keep: float = 0.7) -> jax.Array:
    """The reference 'adaptive' smoothing of a normalised score map, per image.

    With ``S`` the input: ``G`` = Gaussian blur; ``V`` = local variance, min-max normalised;
    ``Wt = 1 - 0.7 V``; ``M = Wt G + (1 - Wt) S`` (smooth flat areas, keep edges); where
    ``S > percentile_90(S)``: ``M = 0.7 S + 0.3 M`` (keep peaks); finally ``M`` is rescaled to the range
    of ``S`` unless it is constant.

    Args:
      grid: ``[B, h, w] float32``.
    Returns:
      ``[B, h, w] float32``.
    """
    s = jnp.asarray(grid, jnp.float32)
    b = s.shape[0]
    g = gaussian_blur(s, sigma)
    v = local_variance(s, var_size)
    v_lo = jnp.min(v, axis=(1, 2), keepdims=True)
    v_hi = jnp.max(v, axis=(1, 2), keepdims=True)
    v = (v - v_lo) / (v_hi - v_lo + jnp.float32(1e-8))
    wt = jnp.float32(1.0) - v * jnp.float32(var_weight)
    m = wt * g + (jnp.float32(1.0) - wt) * s
    thr = percentile_linear(s.reshape(b, -1), peak_percentile)[:, None, None]
    m = jnp.where(s > thr, jnp.float32(peak_keep) * s + jnp.float32(1.0 - peak_keep) * m, m)
    m_lo = jnp.min(m, axis=(1, 2), keepdims=True)
    m_hi = jnp.max(m, axis=(1, 2), keepdims=True)
    s_lo = jnp.min(s, axis=(1, 2), keepdims=True)
    s_hi = jnp.max(s, axis=(1, 2), keepdims=True)
    varies = m_hi > m_lo
    # the guarded denominator only matters where the map is constant and the branch is discarded
    unit = (m - m_lo) / jnp.where(varies, m_hi - m_lo, jnp.float32(1.0))
    return jnp.where(varies, unit * (s_hi - s_lo) + s_lo, m)


def bicubic_resize(grid: jax.Array, out_size: tuple[int, int] | None = None, *,
                   scale_factor: int | float | None = None) -> jax.Array:
    """``torch.nn.functional.interpolate(x, mode='bicubic', align_corners=False)`` per image.

    Cubic convolution with A = -0.75 (``jax.image.resize`` uses A = -0.5 and differs); overshoots the
    input range. Give ``out_size`` (source scale ``in / out``) or ``scale_factor`` (source scale
    ``1 / factor``, output ``floor(in * factor)``), as the two ``interpolate`` calls do.

    Args:
      grid: ``[B, h, w] float32``.
    Returns:
      ``[B, H, W] float32``; width is interpolated first, then height.
    """
    g = jnp.asarray(grid, jnp.float32)
    _, h, w = g.shape
    if out_size is None:
        if scale_factor is None:
            raise ValueError("bicubic_resize needs out_size or scale_factor")
        out_size = (int(math.floor(h * float(scale_factor))), int(math.floor(w * float(scale_factor))))
        scale = float(scale_factor)
    else:
        scale = None
    u_h = jnp.asarray(bicubic_matrix(h, out_size[0], scale))
    u_w = jnp.asarray(bicubic_matrix(w, out_size[1], scale))
    g = jnp.einsum("bhw,xw->bhx", g, u_w, precision=_HI)
    return jnp.einsum("yh,bhx->byx", u_h, g, precision=_HI)


def consolidate(block_scores: jax.Array, grid: tuple[int, int],
                out_grid: tuple[int, int] | None = None) -> dict[str, jax.Array]:
    """Per-block attention scores -> the edit-region map on the token-id grid.

    Args:
      block_scores: ``[B, n_blocks, h*w] float32``, per captured block the text-to-image attention
        averaged over heads and text rows (row-major over the ``h x w`` transformer grid).
      grid: ``(h, w)``, the transformer token grid.
      out_grid: ``(H, W)``, the id grid the map is compared on (default: ``grid``, no resampling).

    Returns:
      dict with ``raw`` ``[B, h*w]`` (mean over blocks), ``rescaled`` ``[B, h*w]``, ``smoothed``
      ``[B, h*w]`` and ``upsampled`` ``[B, H*W]`` (bicubic; equal to ``smoothed`` when the grids
      match), all float32 and row-major.
    """
    x = jnp.asarray(block_scores, jnp.float32)
    bsz, _, n = x.shape
    h, w = grid
    if h * w != n:
        raise ValueError(f"grid {grid} does not hold {n} scores")
    out_grid = tuple(grid if out_grid is None else out_grid)
    raw = jnp.mean(x, axis=1)
    rescaled = rescale(raw)
    smoothed = adaptive_smooth(rescaled.reshape(bsz, h, w))
    if out_grid == (h, w):
        upsampled = smoothed
    else:
        upsampled = bicubic_resize(smoothed, out_grid)
    return dict(raw=raw, rescaled=rescaled, smoothed=smoothed.reshape(bsz, h * w),
                upsampled=upsampled.reshape(bsz, -1))
