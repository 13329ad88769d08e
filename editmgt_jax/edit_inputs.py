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
        out.append(t.strip())
    return out


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
            arr = np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)
        else:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
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
