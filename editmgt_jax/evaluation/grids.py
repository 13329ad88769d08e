"""Image grids of an evaluation report: per-category example rows and the ablation comparison."""

from __future__ import annotations

import os
import re

import numpy as np


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def _tile(img, side: int, min_side: int = 128):
    """An ``[H, W, 3]`` tile with its long side at most ``side``; small tiles are enlarged by a
    whole factor (nearest neighbour, pixels stay sharp) up to ``min_side``."""
    from PIL import Image

    h, w = img.shape[:2]
    if max(h, w) <= side:
        f = max(1, min_side // max(h, w))
        return np.repeat(np.repeat(img, f, axis=0), f, axis=1) if f > 1 else img
    s = side / max(h, w)
    return np.asarray(Image.fromarray(img).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR))


def image_grid(rows, *, gap: int = 2, tile: int = 256):
    """Rows of ``[H, W, 3] uint8`` tiles -> one image with white gaps (tiles padded to one size)."""

    rows = [[_tile(t, tile) for t in r] for r in rows]
    th = max(t.shape[0] for r in rows for t in r)
    tw = max(t.shape[1] for r in rows for t in r)
    ncol = max(len(r) for r in rows)
    out = np.full((len(rows) * (th + gap) + gap, ncol * (tw + gap) + gap, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, t in enumerate(r):
            y, x = gap + i * (th + gap), gap + j * (tw + gap)
            out[y:y + t.shape[0], x:x + t.shape[1]] = t
    return out


def mask_overlay(img, mask):
    """The source with the mask's pixels tinted red and the rest dimmed."""

    a = img.astype(np.float64)
    m = np.asarray(mask, bool)[..., None]
    red = np.array([255.0, 40.0, 40.0])
    out = np.where(m, 0.45 * a + 0.55 * red, 0.6 * a)
    return np.round(out).astype(np.uint8)


def write_grids(out_dir: str, ev, run_names: list[str]) -> dict:
    """The grids of ``ev`` (an ``editmgt_jax.evaluation.runner.Evaluation``) in ``out_dir/grids/``:
    ``{"categories": {category: (path, item ids)}, "ablations": (path, columns)?}``."""

    from editmgt_jax import imageio

    gdir = os.path.join(out_dir, "grids")
    os.makedirs(gdir, exist_ok=True)
    out: dict = {"categories": {}}
    base = ev.kept.get("base", {})
    for c in ev.categories:
        rows, ids = [], []
        for i in ev.grid_items.get(c, []):
            if i not in base:
                continue
            it = ev.items[i]
            blank = np.full_like(it["source"], 235)
            hm = base[i]["heatmap"]
            rows.append([it["source"], it["target"], base[i]["edit"],
                         imageio.heatmap_overlay(it["source"], hm) if hm is not None else blank,
                         mask_overlay(it["source"], it["mask"]) if it["mask"] is not None else blank])
            ids.append(it["id"])
        if rows:
            name = f"{_slug(c)}.png"
            imageio.save_image(os.path.join(gdir, name), image_grid(rows))
            out["categories"][c] = (f"grids/{name}", ids)
    cols = ["source", "target", "identity", "vq_reconstruction"] + run_names
    rows = []
    for i in ev.ablation_grid_items:
        it = ev.items[i]
        blank = np.full_like(it["source"], 235)
        row = [it["source"], it["target"]]
        row += [ev.kept.get(n, {}).get(i, {}).get("edit", blank) for n in cols[2:]]
        rows.append(row)
    if rows and len(run_names) > 1:
        imageio.save_image(os.path.join(gdir, "ablations.png"), image_grid(rows))
        out["ablations"] = ("grids/ablations.png", cols)
    return out
