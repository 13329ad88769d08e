"""Returning an edit at the input's own size: the edited pixels blended into the original source.

The model works on a resized copy of the input (``imageio.fit_to_grid``: the working image, e.g.
64x40 for a 600x400 photo and the 64 px default model, 1024x672 for the 1024 px release) and decodes
its tokens back to pixels at that size. Every pixel of that decode differs from the source a little,
changed or not (the tokenizer's reconstruction error), and it is small. The returned image is
therefore the ORIGINAL source, at its own size, with the model's output blended in through a soft
region map::

    out = m * upsample(raw) + (1 - m) * original          (per pixel, m in [0, 1])

so where ``m == 0`` the output IS the source (bit for bit), where ``m == 1`` it is the upsampled model
output, and in between (a feathered seam a few pixels wide) a mix.

The region map ``m`` is built on the token grid and brought to the input's size:

- ``'changed'`` (default): the tokens whose final id differs from the source's id, dilated by one token
  (8-neighbourhood: the decoder's receptive field spreads a changed token's pixels onto its
  neighbours);
- ``'pixels'``: within those dilated changed tokens, only the pixels whose decoded edit differs from
  the decoded source (the tokenizer's reconstruction of the unedited image) by more than
  :data:`PIXEL_THRESHOLD` of the range: the pixels the edit moved, not the token-wide ring of
  reconstruction error around them (its map is built on the pixel grid of the working image);
- ``'map'``: the tokens whose edit-region score (the consolidated attention map the sampler
  computes, ``EditResult.heatmaps``, averaged over the steps) is at least a threshold (the sampler's
  hold threshold, 0.5 when hold is off), dilated by one token;
- ``'none'``: no blend; the raw model output at the working size is returned.

The token mask becomes a pixel map by a separable partition of unity: along each axis, an input
pixel's membership of token ``i`` is the token's interval convolved with a box ``feather`` input
pixels wide (a linear ramp centred on the token edge). The map is 1 on the changed tokens
themselves (the ramp is at most a token wide, so it stays within the dilation ring), exactly 0 more
than ``feather / 2`` pixels outside the dilated mask, and bilinear at corners. The default
``feather`` is a quarter of a token at the input's scale, at least 3 px, at most one token.

Everything runs on the host in numpy / Pillow, in strips of rows, so a large photo costs a few
strips of float32 plus the output (and the ``[H, W] float32`` map that ``EditResult`` keeps): the
model output is upsampled per strip with Pillow's bicubic filter in float mode (antialiased when
the input is smaller than the working image), which gives the same rows as one whole-image resize.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from editmgt_jax import imageio

MODES = ("changed", "pixels", "map", "none")
# ``pixels``: a working-size pixel takes the edit where its decoded edit differs from the decoded
# source by more than this fraction of the pixel range (largest channel difference).
PIXEL_THRESHOLD = 0.15
STRIP_PIXELS = 1 << 21          # pixels per strip of rows (24 MB of float32 RGB)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the working image sits in the input.

    Attributes:
      input_hw: ``(H, W)`` of the input image.
      work_hw: ``(h, w)`` of the working image the model edits.
      box: ``(x0, y0, x1, y1)``: the part of the input the working image shows, in input pixels
        (pixel edges: the whole image is ``(0, 0, W, H)``; the ``'crop'`` policy shows a centre box).
    """

    input_hw: tuple[int, int]
    work_hw: tuple[int, int]
    box: tuple[float, float, float, float]

    @property
    def pixel_range(self) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)``: the input pixels lying wholly inside the box (the rest keep the source)."""
        x0, y0, x1, y1 = self.box
        eps = 1e-6
        return (max(0, math.ceil(y0 - eps)), min(self.input_hw[0], math.floor(y1 + eps)),
                max(0, math.ceil(x0 - eps)), min(self.input_hw[1], math.floor(x1 + eps)))


def placement(height: int, width: int, size: int, granularity: int, policy: str = "fit") -> Placement:
    """The placement ``imageio.fit_to_grid(img, size, granularity, policy)`` gives a ``height x width`` image."""
    work, box = imageio.working_box(height, width, size, granularity, policy)
    return Placement((int(height), int(width)), work, box)


# ----------------------------------------------------------------------------- token masks
def dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """Binary dilation of ``[h, w] bool`` by ``steps`` tokens (3x3 neighbourhood per step)."""
    m = np.asarray(mask, bool)
    for _ in range(steps):
        p = np.pad(m, 1)
        m = np.zeros_like(m)
        for dy in range(3):
            for dx in range(3):
                m |= p[dy:dy + m.shape[0], dx:dx + m.shape[1]]
    return m


def changed_tokens(tokens: np.ndarray, source_tokens: np.ndarray, dilation: int = 1) -> np.ndarray:
    """``[h, w] bool``: tokens whose id differs from the source's, dilated by ``dilation`` tokens."""
    return dilate(np.asarray(tokens) != np.asarray(source_tokens), dilation)


def changed_pixels(tokens: np.ndarray, source_tokens: np.ndarray, raw: np.ndarray, source_raw: np.ndarray,
                   threshold: float = PIXEL_THRESHOLD, dilation: int = 1) -> np.ndarray:
    """``[H, W] bool`` at the working size: inside the changed tokens (dilated by ``dilation``), the
    pixels whose decoded edit ``raw`` differs from the decoded source ``source_raw`` (both ``[H, W,
    3]`` uint8 at the working size) by more than ``threshold`` of the range in some channel.

    The decoder reproduces an unchanged neighbourhood up to its reconstruction error, so a pixel
    whose decode did not move keeps the source's own value; a recoloured shape takes only its own
    pixels, not the token-wide ring around it."""
    tokens, raw, source_raw = np.asarray(tokens), np.asarray(raw), np.asarray(source_raw)
    if raw.shape != source_raw.shape:
        raise ValueError(f"changed_pixels: edit {raw.shape} and source decode {source_raw.shape} differ")
    h, w = tokens.shape
    if raw.shape[0] % h or raw.shape[1] % w:
        raise ValueError(f"changed_pixels: {raw.shape[:2]} pixels do not tile the {h}x{w} token grid")
    near = changed_tokens(tokens, source_tokens, dilation)
    near = np.repeat(np.repeat(near, raw.shape[0] // h, axis=0), raw.shape[1] // w, axis=1)
    diff = np.abs(raw.astype(np.int16) - source_raw.astype(np.int16)).max(axis=-1)
    return near & (diff > np.float32(threshold) * 255.0)


def map_tokens(heatmap: np.ndarray, id_hw: tuple[int, int], threshold: float, dilation: int = 1) -> np.ndarray:
    """``[h, w] bool`` on the id grid: ``heatmap >= threshold`` (the map's grid is the id grid or a
    divisor of it, e.g. half with a down-sampling transformer; each score covers its ids), dilated."""
    hm = np.asarray(heatmap, np.float32)
    gh, gw = hm.shape
    h, w = id_hw
    if h % gh or w % gw:
        raise ValueError(f"edit-region map of {gh}x{gw} does not divide the {h}x{w} token grid")
    on_ids = np.repeat(np.repeat(hm, h // gh, axis=0), w // gw, axis=1)
    return dilate(on_ids >= np.float32(threshold), dilation)


# ----------------------------------------------------------------------------- maps at input size
def default_feather(pl: Placement, grid_hw: tuple[int, int]) -> float:
    """A quarter of a token at the input's scale, at least 3 px, at most one token."""
    x0, y0, x1, y1 = pl.box
    token = min((y1 - y0) / grid_hw[0], (x1 - x0) / grid_hw[1])
    return float(min(token, max(3.0, token / 4.0)))


def _axis_membership(n_pix: int, lo: float, hi: float, n_tok: int, feather: float) -> np.ndarray:
    """``[n_pix, n_tok] float32``: membership of each input pixel (centre ``p + 0.5``) in each token's
    interval of ``[lo, hi)``, ramped over ``feather`` pixels around every inner token edge. Rows sum to
    1; the first and last tokens extend to the image border."""
    t = ((np.arange(n_pix, dtype=np.float64) + 0.5) - lo) * (n_tok / (hi - lo))      # token coordinate
    half = 0.5 * min(float(feather) * n_tok / (hi - lo), 1.0)                            # ramp half-width
    edges = np.arange(1, n_tok, dtype=np.float64)
    if half > 0:
        above = np.clip((t[:, None] - edges[None, :]) / (2 * half) + 0.5, 0.0, 1.0)     # past edge k
    else:
        above = (t[:, None] >= edges[None, :]).astype(np.float64)
    ones, zeros = np.ones((n_pix, 1)), np.zeros((n_pix, 1))
    cum = np.concatenate([ones, above, zeros], axis=1)   # cum[:, i] = "at or past the start of token i"
    return (cum[:, :-1] - cum[:, 1:]).astype(np.float32)


def _strips(n_rows: int, width: int):
    step = max(1, STRIP_PIXELS // max(1, width))
    for y in range(0, n_rows, step):
        yield y, min(n_rows, y + step)


def region_map(token_mask: np.ndarray, pl: Placement, feather: float | None = None) -> np.ndarray:
    """``[H, W] float32`` in [0, 1] at the input's size from a ``[h, w] bool`` token mask."""
    m = np.asarray(token_mask, np.float32)
    gh, gw = m.shape
    if feather is None:
        feather = default_feather(pl, (gh, gw))
    H, W = pl.input_hw
    ry0, ry1, rx0, rx1 = pl.pixel_range
    x0, y0, x1, y1 = pl.box
    out = np.zeros((H, W), np.float32)
    if not m.any() or ry1 <= ry0 or rx1 <= rx0:
        return out
    a = _axis_membership(H, y0, y1, gh, feather)[ry0:ry1]                 # [rows, gh]
    b = _axis_membership(W, x0, x1, gw, feather)[rx0:rx1]                 # [cols, gw]
    # only the bounding rows / columns of the mask's support are computed
    rows = np.flatnonzero(a @ m.any(axis=1).astype(np.float32) > 0)
    cols = np.flatnonzero(b @ m.any(axis=0).astype(np.float32) > 0)
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    right = m @ b[c0:c1].T                                                 # [gh, cols]
    for s0, s1 in _strips(r1 - r0, c1 - c0):
        block = out[ry0 + r0 + s0:ry0 + r0 + s1, rx0 + c0:rx0 + c1]
        np.matmul(a[r0 + s0:r0 + s1], right, out=block)
        np.clip(block, 0.0, 1.0, out=block)
    return out


def grid_to_input(grid: np.ndarray, pl: Placement, fill: float | None = None) -> np.ndarray:
    """Any map on the working image's grid (scores, ``[gh, gw]``) -> ``[H, W] float32`` at the input's
    size (bilinear over the box; ``fill``, default the map's minimum, outside it). For display."""
    from PIL import Image

    g = np.asarray(grid, np.float32)
    H, W = pl.input_hw
    out = np.full((H, W), np.min(g) if fill is None else fill, np.float32)
    ry0, ry1, rx0, rx1 = pl.pixel_range
    if ry1 <= ry0 or rx1 <= rx0:
        return out
    box = _work_box(pl, g.shape, ry0, ry1, rx0, rx1)
    out[ry0:ry1, rx0:rx1] = np.asarray(Image.fromarray(g, "F").resize((rx1 - rx0, ry1 - ry0), Image.BILINEAR, box=box))
    return out


def _work_box(pl: Placement, hw, ry0, ry1, rx0, rx1) -> tuple[float, float, float, float]:
    """Pillow resize box (in the coordinates of an ``hw`` array over the placement's box) for input
    pixels ``[ry0, ry1) x [rx0, rx1)``."""
    x0, y0, x1, y1 = pl.box
    ky, kx = hw[0] / (y1 - y0), hw[1] / (x1 - x0)
    return ((rx0 - x0) * kx, (ry0 - y0) * ky, (rx1 - x0) * kx, (ry1 - y0) * ky)


def _upsample_rows(chans, pl: Placement, ry0: int, ry1: int, rx0: int, rx1: int) -> np.ndarray:
    """Bicubic resample of the working image (as three Pillow ``F`` images) onto input pixels
    ``[ry0, ry1) x [rx0, rx1)``: ``[rows, cols, 3] float32``, clipped to [0, 255] and rounded."""
    from PIL import Image

    box = _work_box(pl, pl.work_hw, ry0, ry1, rx0, rx1)
    out = np.empty((ry1 - ry0, rx1 - rx0, 3), np.float32)
    for k, c in enumerate(chans):
        out[..., k] = np.asarray(c.resize((rx1 - rx0, ry1 - ry0), Image.BICUBIC, box=box))
    np.clip(out, 0.0, 255.0, out=out)
    return np.rint(out, out=out)


def _channels(raw: np.ndarray):
    from PIL import Image

    return [Image.fromarray(np.ascontiguousarray(raw[..., c], np.float32), "F") for c in range(3)]


def upsample(raw: np.ndarray, pl: Placement) -> np.ndarray:
    """The model output ``[h, w, 3] uint8`` brought to the input's size: ``[H, W, 3] uint8`` (bicubic
    over the placement's box; black outside it). What the composite takes where the map is 1."""
    H, W = pl.input_hw
    out = np.zeros((H, W, 3), np.uint8)
    ry0, ry1, rx0, rx1 = pl.pixel_range
    chans = _channels(raw)
    for s0, s1 in _strips(ry1 - ry0, rx1 - rx0):
        out[ry0 + s0:ry0 + s1, rx0:rx1] = _upsample_rows(chans, pl, ry0 + s0, ry0 + s1, rx0, rx1)
    return out


def blend(original: np.ndarray, raw: np.ndarray, region: np.ndarray, pl: Placement) -> np.ndarray:
    """``region * upsample(raw) + (1 - region) * original``, rounded, ``[H, W, 3] uint8``.

    ``original``: ``[H, W, 3] uint8`` at the input's size; ``raw``: the model output at the working
    size; ``region``: ``[H, W]`` in [0, 1]. Strip by strip, skipping strips the map does not touch.
    """
    original = np.asarray(original)
    if original.shape[:2] != tuple(pl.input_hw) or np.shape(region) != tuple(pl.input_hw):
        raise ValueError(f"blend: original {original.shape[:2]} / region {np.shape(region)} do not match "
                         f"the input size {pl.input_hw}")
    if tuple(np.shape(raw)[:2]) != tuple(pl.work_hw):
        raise ValueError(f"blend: model output {np.shape(raw)[:2]} is not the working size {pl.work_hw}")
    out = original.copy()
    ry0, ry1, rx0, rx1 = pl.pixel_range
    chans = None
    for s0, s1 in _strips(ry1 - ry0, rx1 - rx0):      # the strips of ``upsample``: the same numbers
        y0, y1 = ry0 + s0, ry0 + s1
        m = np.asarray(region[y0:y1, rx0:rx1], np.float32)[..., None]
        if not np.any(m > 0):
            continue
        chans = chans or _channels(raw)
        up = _upsample_rows(chans, pl, y0, y1, rx0, rx1)
        src = original[y0:y1, rx0:rx1].astype(np.float32)
        # m * up + (1 - m) * src: exactly src where m == 0 and exactly up where m == 1
        up *= m
        src *= np.float32(1) - m
        up += src
        out[y0:y1, rx0:rx1] = np.rint(up, out=up)
    return out
