"""What ``Editor.edit`` takes, checked and brought to the model's grid: instructions, images, masks,
and the one check of the sampler settings that needs the model (its number of blocks)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from editmgt_jax import imageio
from editmgt_jax.sampling.config import SamplerSettings


class EditError(ValueError):
    """Bad input to an edit (empty instruction, mismatched lengths, unusable mask); names the item."""


def check_instructions(instructions: Sequence[str]) -> list[str]:
    """Stripped instructions; ``EditError`` naming the first one that is not a non-empty string."""
    out = []
    for i, t in enumerate(instructions):
        if not isinstance(t, str):
            raise EditError(f"instruction {i}: expected a string, got {type(t).__name__}")
        if not t.strip():
            raise EditError(f"instruction {i}: empty instruction")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:      # bytes that were not UTF-8, kept as lone surrogates
            raise EditError(f"instruction {i}: not UTF-8 text (an undecodable byte at character {e.start}: "
                            f"{t[max(0, e.start - 10):e.start]!r} then the byte)") from None
        out.append(t.strip())
    return out


def check_edit_call(images, instructions, seed, size, granularity: int) -> tuple[list, list[str]]:
    """The arguments of ``Editor.edit`` that are not images' pixels, checked: ``(images as a list,
    stripped instructions)``; ``EditError`` naming the argument otherwise. ``seed`` must be an
    integer in [0, 2**32), or a list of such, one per image (JAX keeps 32 bits of a seed: larger
    ones would repeat smaller ones' draws), ``size`` None or a positive integer multiple of ``granularity``."""
    if isinstance(instructions, str):
        instructions = [instructions]
    if instructions is None or not isinstance(instructions, Sequence):
        raise EditError(f"instructions: expected a string or a list of strings, got {type(instructions).__name__}")
    seeds = list(seed) if isinstance(seed, (list, tuple, np.ndarray)) else [seed]   # one, or one per image
    for name, value in [("seed", s_) for s_ in seeds] + [("size", size)]:
        if value is None and name == "size":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise EditError(f"{name}={value!r}: expected an integer, got {type(value).__name__}")
    for s_ in seeds:
        if not 0 <= int(s_) < 2**32:
            raise EditError(f"seed={s_}: must be in [0, {2**32 - 1}] (the seeds that give distinct draws)")
    if size is not None and (int(size) < granularity or int(size) % granularity):
        raise EditError(f"size={size}: must be a positive multiple of {granularity} (this model's pixels per "
                        "token side)")
    if not isinstance(images, (list, tuple)):
        images = [images]
    return list(images), check_instructions(instructions)


def spans(numbers: Sequence[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    out, nums = [], sorted(set(numbers))
    for x in nums:
        if out and x == out[-1][1] + 1:
            out[-1][1] = x
        else:
            out.append([x, x])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in out)


def check_blocks(settings: SamplerSettings, *, num_blocks: int, num_layers: int) -> SamplerSettings:
    """``settings`` when its consolidation blocks exist in a transformer of ``num_blocks`` blocks
    (``num_layers`` of them dual-stream), else ``EditError`` naming them."""
    bad = [b for b in settings.consolidation_blocks if b >= num_blocks]
    if bad:
        raise EditError(f"consolidation_blocks {spans(bad)} out of range: this model's blocks are "
                        f"0-{num_blocks - 1} ({num_layers} dual-stream, then single-stream)")
    return settings


def load_rgb(image, *, name: str | None = None) -> np.ndarray:
    """Path / bytes / PIL image / array -> ``[H, W, 3] uint8`` at its own size."""
    if isinstance(image, (str, os.PathLike)):
        return imageio.load_image(image, name=f"{name} ({os.fspath(image)})" if name else None)
    if isinstance(image, (bytes, bytearray)):
        return imageio.load_image(image, name=name)
    if hasattr(image, "mode") and hasattr(image, "size"):
        return imageio.to_rgb8(image, name or "<PIL image>")
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise EditError(f"{name or 'image'}: expected [H, W, 3] array, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all():
                raise EditError(f"{name or 'image'}: float array with NaN or infinite values")
            low, high = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
            if low < 0 or high > 1:
                raise EditError(f"{name or 'image'}: float array with values in [{low:g}, {high:g}]; float images "
                                "must be in [0, 1] (pass uint8 for 0-255)")
            arr = np.round(arr * 255).astype(np.uint8)
        elif np.issubdtype(arr.dtype, np.integer):
            if arr.size and (arr.min() < 0 or arr.max() > 255):
                raise EditError(f"{name or 'image'}: {arr.dtype} array with values in [{arr.min()}, {arr.max()}]; "
                                "integer images must be in [0, 255]")
            arr = arr.astype(np.uint8)
        else:
            raise EditError(f"{name or 'image'}: cannot read an array of {arr.dtype} as an image")
    return arr[..., :3]


def mask_to_work(mask, original: np.ndarray, size: int, granularity: int, policy: str) -> np.ndarray:
    """A mask at the input's size goes through the image's own resize (crop included); other
    sizes are left to :func:`mask_to_grid`."""
    m = np.asarray(mask)
    m = m[..., 0] if m.ndim == 3 else m
    if m.shape != original.shape[:2]:
        return m
    rgb = np.repeat(((m > 0) * 255).astype(np.uint8)[..., None], 3, axis=-1)
    return imageio.fit_to_grid(rgb, size, granularity, policy)[..., 0] > 127


def mask_to_grid(mask, hw, grid, i) -> np.ndarray:
    """``[gh, gw] bool`` token mask of mask ``i`` (resized to ``hw`` pixels first when needed): a token
    is selected when any of its pixels is; ``EditError`` when none is."""
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., 0]
    if m.shape != tuple(hw):
        from PIL import Image

        m = np.asarray(Image.fromarray((m > 0).astype(np.uint8) * 255).resize((hw[1], hw[0]), Image.NEAREST))
    m = m > 0
    fy, fx = hw[0] // grid[0], hw[1] // grid[1]
    g = m.reshape(grid[0], fy, grid[1], fx).any(axis=(1, 3))
    if not g.any():
        raise EditError(f"mask {i}: selects no pixels")
    return g


# ----------------------------------------------------------------------------- memory
def edit_memory_bytes(tr_cfg, vq_cfg, work_hw: tuple[int, int], batch: int, text_len: int = 0,
                      itemsize: int = 4) -> int:
    """An estimate of the working memory one compiled edit of ``batch`` images at ``work_hw``
    pixels takes on one device (parameters excluded), from the model configs alone.

    The terms that grow with the image: the logits over the codebook at every image token
    (with their softmax and the draw), the transformer's activations over the joint sequence
    (text, target and reference tokens; attention is blocked, so no sequence-squared term), and the
    tokenizer's convolutions at each resolution level. Guidance doubles the batch of the
    transformer. Checked against the compiled program's own memory analysis (shipped model, one
    image): 121 MiB of temporaries at 256 px and 482 MiB at 512 px (two float32 copies of the
    logits, the rest small), where this gives 174 and 648 MiB."""
    h, w = int(work_hw[0]), int(work_hw[1])
    f = int(vq_cfg.downsample_factor)
    tokens = (h // f) * (w // f)
    rows = 2 * batch                                     # conditional and unconditional rows
    seq = text_len + 2 * tokens                          # text, target, reference
    mlp = int(getattr(tr_cfg, "mlp_ratio", 4))
    activations = rows * seq * int(tr_cfg.inner_dim) * (2 + mlp) * itemsize    # residual, q/k/v or MLP
    logits = rows * tokens * int(tr_cfg.codebook_size) * 4 * 2          # float32: logits and probabilities
    pixels = h * w
    tokenizer = batch * sum(int(c) * pixels // 4 ** level
                            for level, c in enumerate(vq_cfg.block_out_channels)) * itemsize * 2
    return activations + logits + tokenizer + (16 << 20)                 # + one attention block (16 MiB)


def available_memory_bytes(device) -> int | None:
    """Memory free for a program on ``device``: the accelerator's limit less what is in use, or on
    the CPU the host's available memory (psutil, else ``os.sysconf``); None when unknown."""
    if device.platform != "cpu":
        try:
            stats = device.memory_stats() or {}
        except Exception:  # noqa: BLE001  (a backend without memory statistics)
            stats = {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None


MIN_IMAGE_SIDE = 8     # pixels: anything smaller carries too little to edit


def check_working_sizes(tr_cfg, vq_cfg, image_hw: Sequence[tuple[int, int]], size: int, granularity: int,
                        policy: str, *, devices: int, device) -> None:
    """``EditError`` for images the working resize cannot represent (a side under
    ``MIN_IMAGE_SIDE`` pixels; with 'fit', a short side that would shrink below half a token, so
    the token row would be mostly invented) and for edits expected not to fit in memory
    (``check_edit_memory``). Before anything is compiled."""
    for i, (h, w) in enumerate(image_hw):
        if min(h, w) < MIN_IMAGE_SIDE:
            raise EditError(f"image {i}: {w}x{h} pixels is too small to edit (each side at least "
                            f"{MIN_IMAGE_SIDE} pixels)")
        short = min(h, w) * size / max(h, w)
        if policy == "fit" and short < granularity / 2:
            raise EditError(f"image {i}: {w}x{h} pixels is too narrow for size {size}: its short side would be "
                            f"{short:.2g} pixels, under half a token ({granularity} pixels); crop it first, or "
                            "use policy 'crop' (--resize crop)")
    check_edit_memory(tr_cfg, vq_cfg, image_hw, size, granularity, policy, devices=devices, device=device)


def check_resolution(resolution, granularity: int, path) -> None:
    """``CheckpointError`` naming the checkpoint's ``config.json`` when its working resolution is not a
    positive multiple of the model's pixels per token (its recommended sampler settings are checked
    when its conventions record is read)."""
    from editmgt_jax.checkpoints import CheckpointError

    where = os.path.join(os.fspath(path), "config.json") if path else "config.json"
    res = resolution
    if isinstance(res, bool) or not isinstance(res, (int, np.integer)) or res < granularity or res % granularity:
        raise CheckpointError(f"{where}: resolution {res!r} (the checkpoint's working size) is not a positive "
                              f"multiple of this model's {granularity} pixels per token")


def check_edit_memory(tr_cfg, vq_cfg, image_hw: Sequence[tuple[int, int]], size: int, granularity: int,
                      policy: str, *, devices: int, device, text_len: int = 0, itemsize: int = 4,
                      available: int | None = None) -> None:
    """``EditError`` when editing images of ``image_hw`` (their own sizes) at working ``size`` is
    expected to need more memory than ``device`` has free, naming the largest size that fits.
    Images of one working shape run as one program, their batch split over ``devices``."""
    if available is None:
        available = available_memory_bytes(device)
    if available is None:
        return
    per_host = devices if device.platform == "cpu" else 1     # CPU devices share the host's memory

    def need(s: int) -> int:
        groups: dict[tuple, int] = {}
        for hh, ww in image_hw:
            shape = imageio.target_size(hh, ww, s, granularity, policy)
            groups[shape] = groups.get(shape, 0) + 1
        return max(edit_memory_bytes(tr_cfg, vq_cfg, shape, -(-n // devices), text_len, itemsize) * per_host
                   for shape, n in groups.items())

    needed = need(size)
    if needed <= available:
        return
    lo, hi = 0, size // granularity                 # the largest multiple of the granularity that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if need(mid * granularity) <= available:
            lo = mid
        else:
            hi = mid - 1
    fits = (f"the largest size that fits is {lo * granularity}" if lo else
            "no size fits; free memory or edit fewer images at once")
    raise EditError(f"size={size}: this edit needs about {needed / 2**30:.1f} GiB, more than the "
                    f"{available / 2**30:.1f} GiB free on {device.platform}; {fits}")
