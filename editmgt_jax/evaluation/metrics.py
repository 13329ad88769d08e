"""Image-edit metrics in plain NumPy: fidelity, leakage outside the edit region, and edit-map quality.

Conventions (shared by every function here):

- Images are ``[H, W]`` or ``[H, W, C]`` arrays, uint8 or float; ``data_range`` is the span of the
  pixel values (255 for uint8, 1 for floats in ``[0, 1]``). Arithmetic is in float64.
- ``region`` (optional) is an ``[H, W]`` boolean array: a metric with a region is computed over the
  selected pixels only (all channels of each selected pixel). An empty region gives ``None``: the
  metric is undefined there, and aggregates skip it.
- ``l1`` is the mean absolute difference divided by ``data_range``, so it lies in ``[0, 1]``.
- ``psnr`` is ``10 log10(data_range^2 / MSE)`` in dB. Identical pixels give an infinite PSNR; it is
  capped at ``PSNR_CAP_DB`` (100 dB, an MSE of 1e-10 of the squared range), so every value, each mean
  and the JSON reports stay finite. A capped value means "no difference at all".
- ``ssim`` is the mean structural similarity of Wang et al. (2004) with an 11-tap Gaussian window
  (sigma 1.5, truncated at 3.5 sigma), K1 = 0.01, K2 = 0.03, population covariances, reflected
  borders, the map cropped by the window radius before averaging and averaged over channels: the
  numbers of ``skimage.metrics.structural_similarity(a, b, data_range=..., channel_axis=-1,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.
- Score maps (the sampler's consolidated edit-region map) live on the token grid; ``upsample_scores``
  brings them to pixels. ``mask_iou`` compares a boolean prediction with a mask;
  ``top_fraction_mask`` and ``threshold_mask`` make the prediction from a score map (the two
  threshold rules of the report); ``auroc`` is threshold-free and rank-based, with ties counted half.
- ``edit_success`` judges whether an edit happened (inside the ground-truth region, closer to the
  target than half the source's distance); ``changed_token_accuracy`` scores token predictions on
  the positions the edit changes (copying the source scores 0).
"""

from __future__ import annotations

import math

import numpy as np

PSNR_CAP_DB = 100.0
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.ndim not in (2, 3):
        raise ValueError(f"expected [H, W] or [H, W, C] images, got shape {a.shape}")
    return a.astype(np.float64), b.astype(np.float64)


def _region(region, shape: tuple[int, ...]) -> np.ndarray | None:
    if region is None:
        return None
    r = np.asarray(region)
    if r.ndim == 3 and r.shape[-1] == 1:
        r = r[..., 0]
    if r.shape != tuple(shape[:2]):
        raise ValueError(f"region of shape {r.shape} does not match images of shape {shape}")
    return r.astype(bool)


def _select(diff: np.ndarray, region: np.ndarray | None) -> np.ndarray | None:
    """The entries of ``diff`` ([H, W] or [H, W, C]) inside ``region``; None when it selects nothing."""
    if region is None:
        return diff
    if not region.any():
        return None
    return diff[region]


def mse(a, b, *, region=None) -> float | None:
    """Mean squared difference, over ``region`` when given (``None`` if the region is empty)."""
    a, b = _pair(a, b)
    d = _select((a - b) ** 2, _region(region, a.shape))
    return None if d is None else float(np.mean(d))


def l1(a, b, *, data_range: float = 255.0, region=None) -> float | None:
    """Mean absolute difference divided by ``data_range`` (in ``[0, 1]``), over ``region`` when given."""
    a, b = _pair(a, b)
    d = _select(np.abs(a - b), _region(region, a.shape))
    return None if d is None else float(np.mean(d)) / float(data_range)


def psnr_from_mse(err: float | None, *, data_range: float = 255.0, cap: float = PSNR_CAP_DB) -> float | None:
    """``10 log10(data_range^2 / err)``, at most ``cap`` dB (``err == 0`` gives ``cap``)."""
    if err is None:
        return None
    if err <= 0.0:
        return float(cap)
    return float(min(cap, 10.0 * math.log10(float(data_range) ** 2 / err)))


def psnr(a, b, *, data_range: float = 255.0, region=None, cap: float = PSNR_CAP_DB) -> float | None:
    """Peak signal-to-noise ratio in dB, capped at ``cap``; over ``region`` when given."""
    return psnr_from_mse(mse(a, b, region=region), data_range=data_range, cap=cap)


# ---------------------------------------------------------------------------------------- SSIM
def gaussian_window(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> np.ndarray:
    """Normalised 1-D Gaussian taps, radius ``int(truncate * sigma + 0.5)`` (11 taps for sigma 1.5)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / float(sigma)) ** 2)
    return w / w.sum()


def _filter_axis(x: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    """Centred correlation with ``taps`` along ``axis``, half-sample symmetric (reflected) borders."""
    r = (len(taps) - 1) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    xp = np.pad(x, pad, mode="symmetric")
    n = x.shape[axis]
    out = np.zeros_like(x)
    for k, w in enumerate(taps):
        out += w * np.take(xp, np.arange(k, k + n), axis=axis)
    return out


def gaussian_filter2d(x: np.ndarray, sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> np.ndarray:
    """Separable Gaussian blur of an ``[H, W]`` array (scipy ``gaussian_filter``, mode 'reflect')."""
    taps = gaussian_window(sigma, truncate)
    return _filter_axis(_filter_axis(x, taps, 0), taps, 1)


def ssim_map(a, b, *, data_range: float = 255.0, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Per-pixel SSIM of two single-channel ``[H, W]`` images (uncropped)."""
    a, b = _pair(a, b)
    if a.ndim != 2:
        raise ValueError(f"ssim_map takes [H, W] images, got shape {a.shape}")
    f = lambda x: gaussian_filter2d(x, sigma)  # noqa: E731
    ux, uy = f(a), f(b)
    vx = f(a * a) - ux * ux
    vy = f(b * b) - uy * uy
    vxy = f(a * b) - ux * uy
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def ssim(a, b, *, data_range: float = 255.0, sigma: float = SSIM_SIGMA) -> float:
    """Mean SSIM (Gaussian window, sigma 1.5, 11 taps), averaged over channels; see the module notes."""
    a, b = _pair(a, b)
    win = len(gaussian_window(sigma))
    if min(a.shape[:2]) < win:
        raise ValueError(f"SSIM needs images of at least {win}x{win} pixels, got {a.shape[0]}x{a.shape[1]}")
    pad = (win - 1) // 2
    chans = [a[..., None], b[..., None]] if a.ndim == 2 else [a, b]
    vals = []
    for c in range(chans[0].shape[-1]):
        s = ssim_map(chans[0][..., c], chans[1][..., c], data_range=data_range, sigma=sigma)
        vals.append(float(np.mean(s[pad:s.shape[0] - pad, pad:s.shape[1] - pad], dtype=np.float64)))
    return float(np.mean(vals))


# ------------------------------------------------------------------------------ score maps
def upsample_scores(score, shape: tuple[int, int], *, mode: str = "bilinear") -> np.ndarray:
    """A token-grid score map ``[h, w]`` -> ``[H, W]`` float64 at pixel resolution.

    ``mode='nearest'``: every pixel takes the score of the token cell its centre falls in (for sizes
    that are whole multiples, each token becomes an ``H/h x W/w`` block). ``mode='bilinear'``:
    linear interpolation between token centres (half-pixel centres, ``align_corners=False``, edges
    clamped), the usual image resize; it removes the block ties that make top-k thresholds ambiguous.
    """
    s = np.asarray(score, np.float64)
    if s.ndim != 2:
        raise ValueError(f"score map must be [h, w], got shape {s.shape}")
    h, w = s.shape
    out_h, out_w = int(shape[0]), int(shape[1])
    if mode == "nearest":
        iy = np.minimum((np.arange(out_h) * h) // out_h, h - 1)
        ix = np.minimum((np.arange(out_w) * w) // out_w, w - 1)
        return s[iy][:, ix]
    if mode != "bilinear":
        raise ValueError(f"upsampling mode {mode!r}: choose 'bilinear' or 'nearest'")

    def taps(n_in: int, n_out: int):
        x = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
        lo = np.floor(x).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, x - lo

    y0, y1, fy = taps(h, out_h)
    x0, x1, fx = taps(w, out_w)
    rows = s[y0] * (1 - fy)[:, None] + s[y1] * fy[:, None]
    return rows[:, x0] * (1 - fx)[None, :] + rows[:, x1] * fx[None, :]


def mask_iou(pred, mask) -> float:
    """Intersection over union of two boolean ``[H, W]`` masks; 1.0 when both are empty."""
    p = np.asarray(pred, bool)
    m = np.asarray(mask, bool)
    if p.shape != m.shape:
        raise ValueError(f"prediction of shape {p.shape} does not match mask of shape {m.shape}")
    union = np.count_nonzero(p | m)
    if union == 0:
        return 1.0
    return float(np.count_nonzero(p & m) / union)


def top_fraction_mask(score, fraction: float) -> np.ndarray:
    """The pixels whose score is among the top ``fraction`` of all pixels.

    ``k = round(fraction * N)`` (at least 1 when ``fraction > 0``); the threshold is the k-th largest
    score and every pixel at or above it is selected, so ties at the threshold are all included (a
    constant map selects everything). ``fraction <= 0`` selects nothing.
    """
    s = np.asarray(score, np.float64)
    n = s.size
    k = int(round(float(fraction) * n))
    if fraction > 0:
        k = max(k, 1)
    if k <= 0:
        return np.zeros(s.shape, bool)
    k = min(k, n)
    t = np.partition(s.reshape(-1), n - k)[n - k]
    return s >= t


def threshold_mask(score, threshold: float) -> np.ndarray:
    """The pixels with ``score >= threshold`` (the complement of what region hold keeps)."""
    return np.asarray(score, np.float64) >= float(threshold)


def auroc(score, mask) -> float | None:
    """Area under the ROC curve of ``score`` for separating ``mask`` pixels from the others.

    Rank-based (the Mann-Whitney U statistic over all positive/negative pairs): ties get their
    average rank, so a tied pair counts one half. 1.0 = every mask pixel scores above every other
    pixel, 0.5 = no information (e.g. a constant map), 0.0 = inverted. ``None`` when the mask is
    empty or covers everything (one class only).
    """
    s = np.asarray(score, np.float64).reshape(-1)
    m = np.asarray(mask, bool).reshape(-1)
    if s.shape != m.shape:
        raise ValueError(f"score map of {s.size} values does not match mask of {m.size} values")
    n_pos = int(np.count_nonzero(m))
    n_neg = m.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg_rank = first + (counts + 1) / 2.0  # 1-based average rank of each tie group
    ranks = np.empty(s.size, np.float64)
    ranks[order] = np.repeat(avg_rank, counts)
    u = float(np.sum(ranks[m])) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


# ------------------------------------------------------------------------------ one edit
def edit_metrics(edit, target, source, *, recon=None, mask=None, data_range: float = 255.0) -> dict:
    """Every per-edit number of the report for one edited image (``None`` where undefined).

    Args:
      edit, target, source: ``[H, W, 3]`` images of one size.
      recon: the VQ reconstruction of ``source`` (the leakage ceiling), or ``None``.
      mask: ``[H, W]`` bool ground-truth edit region (True = the edit may change it), or ``None``.

    Returns:
      ``l1``, ``psnr``, ``ssim`` against the target; ``psnr_in`` against the target inside the mask;
      ``leak_l1_src``, ``leak_psnr_src`` (outside the mask, against the source) and
      ``leak_l1_rec``, ``leak_psnr_rec`` (outside the mask, against ``recon``).
    """
    out = {
        "l1": l1(edit, target, data_range=data_range),
        "psnr": psnr(edit, target, data_range=data_range),
        "ssim": ssim(edit, target, data_range=data_range),
        "psnr_in": None,
        "leak_l1_src": None,
        "leak_psnr_src": None,
        "leak_l1_rec": None,
        "leak_psnr_rec": None,
    }
    if mask is not None:
        m = np.asarray(mask, bool)
        outside = ~m
        out["psnr_in"] = psnr(edit, target, data_range=data_range, region=m)
        out["leak_l1_src"] = l1(edit, source, data_range=data_range, region=outside)
        out["leak_psnr_src"] = psnr(edit, source, data_range=data_range, region=outside)
        if recon is not None:
            out["leak_l1_rec"] = l1(edit, recon, data_range=data_range, region=outside)
            out["leak_psnr_rec"] = psnr(edit, recon, data_range=data_range, region=outside)
    return out


def edit_distances(edit, target, source, mask) -> tuple[float, float] | None:
    """Mean per-pixel Euclidean RGB distance inside ``mask``: ``(d(edit, target), d(source, target))``.

    Images ``[H, W, C]`` of one size (any dtype, one value range); ``mask`` ``[H, W]`` bool.
    ``None`` when the mask is empty.
    """
    e, t = _pair(edit, target)
    s, _ = _pair(source, target)
    m = _region(mask, t.shape)
    if not m.any():
        return None
    dist = lambda a: float(np.mean(np.sqrt(np.sum((a - t) ** 2, axis=-1))[m]))  # noqa: E731
    return dist(e), dist(s)


def edit_success(edit, target, source, mask, *, ratio: float = 0.5) -> bool | None:
    """Did the edit happen? Inside the ground-truth region the output must be closer to the target
    than ``ratio`` times the source's distance to it (mean Euclidean RGB distance per pixel).

    Returning the source fails by construction (``d < ratio * d`` is false). ``None`` when the mask
    is empty or the source already equals the target there (nothing to judge).
    """
    d = edit_distances(edit, target, source, mask)
    if d is None or d[1] <= 0.0:
        return None
    return bool(d[0] < ratio * d[1])


# Clean edit success: the edit happened inside the ground-truth region AND the rest of the picture is
# the source's. Outside is judged when it covers at least this fraction of the picture.
KEPT_PSNR_DB = 30.0
KEPT_MIN_FRACTION = 0.05


def kept_outside(edit, source, mask, *, min_db: float = KEPT_PSNR_DB,
                 min_fraction: float = KEPT_MIN_FRACTION) -> bool | None:
    """Is the picture outside the ground-truth region the source's? PSNR against the source over the
    pixels outside ``mask`` is at least ``min_db``. ``None`` when outside covers less than
    ``min_fraction`` of the picture (a whole-picture edit: nothing outside to keep)."""
    m = np.asarray(mask, bool)
    if m.ndim == 3:
        m = m[..., 0]
    outside = ~m
    if outside.mean() < min_fraction:
        return None
    return bool(psnr(edit, source, region=outside) >= min_db)


def clean_edit_success(edit, target, source, mask, *, ratio: float = 0.5, min_db: float = KEPT_PSNR_DB,
                       min_fraction: float = KEPT_MIN_FRACTION) -> dict:
    """Clean edit success of one item, with its two halves.

    ``inside``: :func:`edit_success` (inside the mask the edit is closer to the target than ``ratio``
    times the source's distance). ``kept``: :func:`kept_outside` (outside PSNR vs the source >=
    ``min_db``; ``None`` when outside is under ``min_fraction`` of the picture). ``clean``: both
    (``kept`` not judged counts as kept). Returning the source fails ``inside``; repainting the whole
    picture fails ``kept``. All ``None`` when the item cannot be judged (empty mask, or the source
    already equals the target inside).
    """
    inside = edit_success(edit, target, source, mask, ratio=ratio)
    if inside is None:
        return {"clean": None, "inside": None, "kept": None}
    kept = kept_outside(edit, source, mask, min_db=min_db, min_fraction=min_fraction)
    return {"clean": bool(inside and kept is not False), "inside": inside, "kept": kept}


def changed_token_counts(pred_ids, target_ids, source_ids) -> tuple[int, int]:
    """``(hits, changed)``: among token positions where ``target_ids != source_ids`` (``changed`` of
    them), how many ``pred_ids`` equals the target. Arrays of one shape, any leading axes."""
    p, t, s = (np.asarray(x) for x in (pred_ids, target_ids, source_ids))
    if not (p.shape == t.shape == s.shape):
        raise ValueError(f"token grids differ in shape: {p.shape}, {t.shape}, {s.shape}")
    changed = t != s
    return int(np.sum((p == t) & changed)), int(np.sum(changed))


def changed_token_accuracy(pred_ids, target_ids, source_ids) -> float | None:
    """The fraction of changed positions (target id != source id) that ``pred_ids`` gets right;
    copying the source scores 0. ``None`` when no position changed."""
    hits, changed = changed_token_counts(pred_ids, target_ids, source_ids)
    return hits / changed if changed else None


def changed_region(tokens, source_tokens, shape: tuple[int, int], *, dilate: int = 0) -> np.ndarray:
    """``[H, W]`` bool: the pixels of the token cells whose final id differs from the source's,
    optionally dilated by ``dilate`` cells (8-neighbourhood), upsampled by nearest neighbour."""
    t, s = np.asarray(tokens), np.asarray(source_tokens)
    if t.shape != s.shape or t.ndim != 2:
        raise ValueError(f"token grids must be equal 2-D shapes, got {t.shape} and {s.shape}")
    grid = t != s
    for _ in range(int(dilate)):
        p = np.pad(grid, 1)
        grid = np.zeros_like(grid)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                grid |= p[dy:dy + t.shape[0], dx:dx + t.shape[1]]
    h, w = shape
    if h % t.shape[0] or w % t.shape[1]:
        raise ValueError(f"image {shape} is not a multiple of the token grid {t.shape}")
    return np.repeat(np.repeat(grid, h // t.shape[0], 0), w // t.shape[1], 1)


def map_metrics(score, mask, *, threshold: float, upsample: str = "bilinear") -> dict:
    """IoU (two threshold rules) and AUROC of a token-grid score map against a pixel mask.

    ``iou_topk``: the top ``k`` pixels of the upsampled map, ``k`` = the mask's pixel count (the
    area is given, only the placement is judged). ``iou_fixed``: pixels with ``score >= threshold``.
    All three are ``None`` when the mask is empty or covers the whole image.
    """
    m = np.asarray(mask, bool)
    if m.ndim == 3:
        m = m[..., 0]
    if not m.any() or m.all():
        return {"iou_topk": None, "iou_fixed": None, "auroc": None}
    s = upsample_scores(score, m.shape, mode=upsample)
    return {
        "iou_topk": mask_iou(top_fraction_mask(s, m.mean()), m),
        "iou_fixed": mask_iou(threshold_mask(s, threshold), m),
        "auroc": auroc(s, m),
    }


def aggregate(rows: list[dict], keys: list[str] | tuple[str, ...]) -> dict:
    """``{key: {"mean": float | None, "median": float | None, "n": int}}``: the mean and median of each
    key over the rows where it is set."""
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = {"mean": float(np.mean(vals)) if vals else None,
                  "median": float(np.median(vals)) if vals else None, "n": len(vals)}
    return out
