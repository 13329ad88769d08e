"""Rendering of `synthetic_edits` scenes with PIL, without antialiasing.

Pixels are exactly one colour or another, so an edit's mask is `any(source != target)` exactly.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from editmgt_jax.data.synthetic_edits.scene import COLORS, Background, Scene, Shape


def _polygon(shape: Shape, size: int) -> list[tuple[float, float]]:
  r = shape.radius * size
  cx, cy = shape.cx * size, shape.cy * size
  a0 = math.radians(shape.angle)
  if shape.kind == "square":
    angles, radii = [45, 135, 225, 315], [r] * 4
  elif shape.kind == "triangle":
    angles, radii = [-90, 30, 150], [r] * 3
  elif shape.kind == "hexagon":
    angles, radii = [0, 60, 120, 180, 240, 300], [r] * 6
  elif shape.kind == "star":
    angles = [-90 + 36 * i for i in range(10)]
    radii = [r if i % 2 == 0 else 0.45 * r for i in range(10)]
  elif shape.kind == "ellipse":
    pts = []
    for i in range(48):
      t = 2 * math.pi * i / 48
      x, y = r * math.cos(t), 0.55 * r * math.sin(t)
      pts.append((cx + x * math.cos(a0) - y * math.sin(a0), cy + x * math.sin(a0) + y * math.cos(a0)))
    return pts
  else:
    raise ValueError(f"unknown shape kind {shape.kind!r}")
  return [
      (cx + rad * math.cos(math.radians(a) + a0), cy + rad * math.sin(math.radians(a) + a0))
      for a, rad in zip(angles, radii)
  ]


def render_background(bg: Background, size: int) -> np.ndarray:
  """`[size, size, 3] uint8`."""
  palette = np.array([COLORS[name] for name in bg.colors], np.uint8)
  if bg.kind == "solid":
    return np.broadcast_to(palette[0], (size, size, 3)).copy()
  coord = np.arange(size)
  if bg.kind == "gradient":
    t = (coord / max(size - 1, 1))[:, None]
    line = np.round(palette[0] * (1 - t) + palette[1] * t).astype(np.uint8)  # [size, 3]
  elif bg.kind in ("stripes", "checkerboard"):
    cell = max(2, int(round(bg.period * size)))
    band = (coord // cell) % 2
    if bg.kind == "checkerboard":
      return palette[(band[:, None] + band[None, :]) % 2]
    line = palette[band]
  else:
    raise ValueError(f"unknown background kind {bg.kind!r}")
  # Horizontal patterns vary along y (bands run left to right), vertical ones along x.
  if bg.orient == "horizontal":
    return np.broadcast_to(line[:, None, :], (size, size, 3)).copy()
  return np.broadcast_to(line[None, :, :], (size, size, 3)).copy()


def render(scene: Scene, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Draws `scene` without antialiasing.

  Returns:
    image `[size, size, 3] uint8` and labels `[size, size] uint8` (0 background, i+1 for shape i).
  """
  image = Image.fromarray(render_background(scene.background, size))
  labels = Image.new("L", (size, size), 0)
  draw, draw_labels = ImageDraw.Draw(image), ImageDraw.Draw(labels)
  for i, shape in enumerate(scene.shapes):
    fill = COLORS[shape.color]
    if shape.kind == "circle":
      r = shape.radius * size
      box = [shape.cx * size - r, shape.cy * size - r, shape.cx * size + r, shape.cy * size + r]
      draw.ellipse(box, fill=fill)
      draw_labels.ellipse(box, fill=i + 1)
    else:
      pts = _polygon(shape, size)
      draw.polygon(pts, fill=fill)
      draw_labels.polygon(pts, fill=i + 1)
  return np.asarray(image), np.asarray(labels)


def apply_style(style: str, image: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Whole-image style transforms, `[S, S, 3] uint8 -> [S, S, 3] uint8`."""
  size = image.shape[0]
  pil = Image.fromarray(image)
  if style == "pixelate":
    cells = max(2, size // 8)
    return np.asarray(pil.resize((cells, cells), Image.BOX).resize((size, size), Image.NEAREST))
  if style == "grayscale":
    return np.asarray(pil.convert("L").convert("RGB"))
  if style == "invert":
    return 255 - image
  if style == "posterize":
    return np.asarray(ImageOps.posterize(pil, 2))
  if style == "outline":
    # Black where the label changes between neighbours (shape borders), white elsewhere.
    edge = np.zeros(labels.shape, bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    out = np.full_like(image, 255)
    out[edge] = 0
    return out
  raise ValueError(f"unknown style {style!r}")
