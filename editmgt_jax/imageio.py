"""Reading user images and bringing them to a size the model's token grid can take.

Stated policy (what ``load_image`` and ``fit_to_grid`` do with unusual inputs):

- Orientation: EXIF orientation is applied, as the official pipeline does.
- Modes: grayscale (``L``, ``LA``, ``I``), palette (``P``), CMYK and 16-bit images are converted to
  8-bit RGB; 16-bit values are scaled by 255/65535 (not clipped). Alpha is composited over white.
- Pixel limit: files over ``MAX_PIXELS`` (100 megapixels, e.g. 10000 x 10000) are refused with
  an ``ImageError`` before decoding.
- Size: ``policy='fit'`` (the editor's default): keep the aspect ratio; scale so the long side is
  ``size``, then round each side to the nearest multiple of the model's pixel granularity (VQ factor
  x transformer down-sampling), at least one granule. Nothing is cut off; the aspect ratio moves by
  at most half a granule per side, which the return to the input's size undoes
  (``editmgt_jax.composite``). ``policy='crop'`` (the official behaviour, with a deterministic centre
  crop): resize the short side to ``size`` (bilinear) and take the centre ``size x size`` square.
  Other sizes never crash; they are resized by one of these rules. Padding to a square is not
  offered: the model would spend tokens on borders it never saw in training.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np

POLICIES = ("crop", "fit")

# Largest image accepted, in pixels (10000 x 10000; 300 MB as 8-bit RGB). Larger files are refused
# before their pixels are decoded, whatever Pillow's own decompression-bomb limit is.
MAX_PIXELS = 100_000_000


class ImageError(ValueError):
    """A file that cannot be used as an image; the message names it."""


def load_image(path_or_bytes, *, name: str | None = None) -> np.ndarray:
    """Read an image file (or encoded bytes) as ``[H, W, 3] uint8`` RGB."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    label = name or (os.fspath(path_or_bytes) if not isinstance(path_or_bytes, (bytes, bytearray)) else "<bytes>")
    try:
        with warnings.catch_warnings():
            # Size is checked below against MAX_PIXELS; Pillow's own warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(path_or_bytes, (bytes, bytearray)):
                im = Image.open(io.BytesIO(path_or_bytes))
            else:
                if not os.path.exists(path_or_bytes):
                    raise ImageError(f"{label}: file not found")
                if os.path.isdir(path_or_bytes):
                    raise ImageError(f"{label}: is a directory, not an image file")
                im = Image.open(path_or_bytes)
            try:
                check_pixel_count(im.width, im.height, label)
                im.load()
            except BaseException:
                im.close()
                raise
    except Image.DecompressionBombError as e:   # beyond Pillow's own limit: it gives only the count
        import re

        m = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(m[1]) / 1e6:.0f} megapixels" if m else "too many pixels"
        raise ImageError(f"{label}: image is {size}; {_LIMIT_NOTE}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{label}: image data is corrupt or truncated ({e})") from None
    im = ImageOps.exif_transpose(im)
    return to_rgb8(im, label)


def check_pixel_count(width: int, height: int, label: str) -> None:
    if width * height > MAX_PIXELS:
        raise ImageError(f"{label}: image is {width}x{height} ({width * height / 1e6:.0f} megapixels); "
                         f"{_LIMIT_NOTE}")


_LIMIT_NOTE = (f"the limit is {MAX_PIXELS / 1e6:.0f} megapixels (editmgt_jax.imageio.MAX_PIXELS): "
               f"downscale it first")


WRITABLE_NOTE = "give a file name ending in an image extension, e.g. .png"


def check_output_path(path: str, flag: str = "--out") -> None:
    """Raise ``ImageError`` unless ``save_image(path, ...)`` can write there: a file name whose
    extension Pillow can write, not a directory, in a folder that exists or can be created and is
    writable. An existing file is fine (it will be replaced)."""
    from PIL import Image

    from editmgt_jax.folders import unwritable

    Image.init()
    ext = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        raise ImageError(f"{flag} {path}: is a directory; {WRITABLE_NOTE}")
    if not ext:
        raise ImageError(f"{flag} {path}: no file extension; {WRITABLE_NOTE}")
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise ImageError(f"{flag} {path}: cannot write images of type {ext!r}; {WRITABLE_NOTE}")
    why = unwritable(path, folder=False)
    if why:
        raise ImageError(f"{flag} {path}: {why}")


def to_rgb8(im, label: str = "<image>") -> np.ndarray:
    """Convert any PIL image to ``[H, W, 3] uint8`` following the stated policy."""
    from PIL import Image

    if im.width == 0 or im.height == 0:
        raise ImageError(f"{label}: empty image ({im.width}x{im.height})")
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im).astype(np.float64)
        hi = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(np.round(a * (255.0 / hi)), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=-1)
    if mode == "F":
        a = np.asarray(im, np.float64)
        a = np.clip(np.round(a * 255.0 if a.max() <= 1.0 else a), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=-1)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    arr = np.asarray(im.convert("RGB"))
    if arr.dtype != np.uint8:  # e.g. 16-bit-per-channel RGB from some decoders
        arr = np.clip(np.round(arr.astype(np.float64) * 255.0 / 65535.0), 0, 255).astype(np.uint8)
    return arr


def target_size(height: int, width: int, size: int, granularity: int, policy: str = "crop") -> tuple[int, int]:
    """Output ``(H, W)`` in pixels for an input of ``height x width`` under ``policy``."""
    if policy not in POLICIES:
        raise ValueError(f"resize policy {policy!r}: choose from {POLICIES}")
    if size % granularity:
        raise ValueError(f"size {size} is not a multiple of the model's pixel granularity {granularity}")
    if policy == "crop":
        return size, size
    scale = size / max(height, width)
    h = max(granularity, int(round(height * scale / granularity)) * granularity)
    w = max(granularity, int(round(width * scale / granularity)) * granularity)
    return min(h, size), min(w, size)


def crop_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """The ``'crop'`` policy's resize ``(rh, rw)`` and the ``(top, left)`` of its centre square."""
    scale = size / min(height, width)
    rh, rw = max(size, round(height * scale)), max(size, round(width * scale))
    return rh, rw, (rh - size) // 2, (rw - size) // 2


def working_box(height: int, width: int, size: int, granularity: int,
                policy: str = "fit") -> tuple[tuple[int, int], tuple[float, float, float, float]]:
    """Working ``(H', W')`` of ``fit_to_grid`` and the box ``(x0, y0, x1, y1)`` of the input, in input
    pixels (pixel edges, so ``(0, 0, width, height)`` is the whole image), that it shows."""
    th, tw = target_size(height, width, size, granularity, policy)
    if policy == "crop":
        rh, rw, top, left = crop_geometry(height, width, size)
        sy, sx = height / rh, width / rw
        return (th, tw), (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return (th, tw), (0.0, 0.0, float(width), float(height))


def fit_to_grid(img: np.ndarray, size: int, granularity: int, policy: str = "crop") -> np.ndarray:
    """Resize ``[H, W, 3] uint8`` to the model's grid: returns ``[H', W', 3] uint8``."""
    from PIL import Image

    h, w = img.shape[:2]
    th, tw = target_size(h, w, size, granularity, policy)
    im = Image.fromarray(img)
    if policy == "crop":
        rh, rw, top, left = crop_geometry(h, w, size)
        if (rh, rw) != (h, w):
            im = im.resize((rw, rh), Image.BILINEAR)
        im = im.crop((left, top, left + size, top + size))
    elif (th, tw) != (h, w):
        im = im.resize((tw, th), Image.BILINEAR)
    return np.asarray(im)


def save_image(path: str, img: np.ndarray) -> None:
    """Write ``[H, W, 3]`` uint8 or float in [0, 1] as PNG (or by extension)."""
    from PIL import Image

    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    Image.fromarray(a).save(path)


def heatmap_overlay(img: np.ndarray, score: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blend a score map ``[h, w]`` (any range) over ``[H, W, 3] uint8`` as a colour heatmap."""
    from PIL import Image

    s = np.asarray(score, np.float64)
    lo, hi = float(np.min(s)), float(np.max(s))
    s = (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)
    s = np.asarray(Image.fromarray((s * 255).astype(np.uint8)).resize((img.shape[1], img.shape[0]),
                                                                       Image.BILINEAR), np.float64) / 255.0
    # A perceptually ordered blue -> yellow -> red ramp.
    stops = np.array([[0.0, 0.0, 0.5], [0.0, 0.4, 1.0], [1.0, 1.0, 0.0], [1.0, 0.2, 0.0]])
    x = s * (len(stops) - 1)
    i = np.clip(np.floor(x).astype(int), 0, len(stops) - 2)
    f = (x - i)[..., None]
    colour = stops[i] * (1 - f) + stops[i + 1] * f
    out = (1 - alpha) * img.astype(np.float64) / 255.0 + alpha * colour
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)
