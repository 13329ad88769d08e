"""Scenes of `synthetic_edits`: the named colours, shapes, backgrounds and positions, and random
scene sampling.

A scene is a flat-shaded background (solid, gradient, stripes or checkerboard) with one to four
non-overlapping shapes (circle, square, triangle, star, ellipse, hexagon) in twelve named colours,
two size classes and nine named positions. Geometry is in fractions of the image side.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

# Named colours (RGB). Kept far apart so that every pair is easy to tell apart at 64 px.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 30),
    "green": (40, 170, 60),
    "cyan": (30, 200, 220),
    "blue": (30, 70, 220),
    "purple": (140, 50, 190),
    "pink": (245, 130, 190),
    "brown": (120, 70, 30),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ellipse", "hexagon")
BACKGROUNDS: tuple[str, ...] = ("solid", "gradient", "stripes", "checkerboard")
STYLES: tuple[str, ...] = ("pixelate", "grayscale", "invert", "posterize", "outline")

# Rotational symmetry order: rotating by a multiple of 360/order changes nothing.
SYMMETRY = {"square": 4, "triangle": 3, "star": 5, "ellipse": 2, "hexagon": 6}
ANGLES = (45, 90, 180)
SIZE_RANGES = {"small": (0.07, 0.10), "large": (0.13, 0.17)}
# Minimum gap between shapes and from the border, as a fraction of the image side.
_GAP = 0.02

POSITION_PHRASES = (
    ("in the top left", "at the top", "in the top right"),
    ("on the left", "in the center", "on the right"),
    ("in the bottom left", "at the bottom", "in the bottom right"),
)
MOVES = {"to the left": (-1, 0), "to the right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclasses.dataclass(frozen=True)
class Shape:
  """One object; geometry in fractions of the image side, angle in degrees (clockwise on screen)."""

  kind: str
  color: str
  cx: float
  cy: float
  radius: float
  size: str
  angle: float = 0.0

  @property
  def name(self) -> str:
    return f"{self.color} {self.kind}"


@dataclasses.dataclass(frozen=True)
class Background:
  kind: str
  colors: tuple[str, ...]
  orient: str = "horizontal"
  period: float = 0.125


@dataclasses.dataclass(frozen=True)
class Scene:
  background: Background
  shapes: tuple[Shape, ...]

  @property
  def used_colors(self) -> set[str]:
    return {s.color for s in self.shapes}

  @property
  def names(self) -> set[str]:
    return {s.name for s in self.shapes}


def position_phrase(cx: float, cy: float) -> str:
  """Name of the cell of a 3x3 grid that holds the point (fractions of the side)."""
  return POSITION_PHRASES[min(int(cy * 3), 2)][min(int(cx * 3), 2)]


def choice(rng: np.random.Generator, options: Sequence):
  return options[int(rng.integers(len(options)))]


def fits(cx: float, cy: float, radius: float, others: Sequence[Shape]) -> bool:
  if not (radius + _GAP <= cx <= 1 - radius - _GAP and radius + _GAP <= cy <= 1 - radius - _GAP):
    return False
  return all(math.hypot(cx - o.cx, cy - o.cy) >= radius + o.radius + _GAP for o in others)


def _place(rng: np.random.Generator, radius: float, others: Sequence[Shape]):
  for _ in range(30):
    cx, cy = rng.uniform(radius + _GAP, 1 - radius - _GAP, size=2)
    if fits(cx, cy, radius, others):
      return float(cx), float(cy)
  return None


def random_background(rng: np.random.Generator, avoid: set[str]) -> Background:
  kind = choice(rng, BACKGROUNDS)
  palette = [c for c in COLORS if c not in avoid]
  n = 1 if kind == "solid" else 2
  colors = tuple(palette[i] for i in rng.choice(len(palette), n, replace=False))
  return Background(
      kind=kind,
      colors=colors,
      orient=choice(rng, ("horizontal", "vertical")),
      period=float(rng.uniform(0.08, 0.2)),
  )


def random_shape(rng, others: Sequence[Shape], avoid_colors: set[str]) -> Shape | None:
  names = {o.name for o in others}
  size = choice(rng, tuple(SIZE_RANGES))
  radius = float(rng.uniform(*SIZE_RANGES[size]))
  where = _place(rng, radius, others)
  if where is None:
    return None
  for _ in range(20):
    kind, color = choice(rng, SHAPES), choice(rng, tuple(COLORS))
    if color not in avoid_colors and f"{color} {kind}" not in names:
      return Shape(kind, color, where[0], where[1], radius, size)
  return None


def random_scene(rng: np.random.Generator, min_shapes: int = 1, max_shapes: int = 4) -> Scene:
  """A background and `min_shapes..max_shapes` non-overlapping shapes with unique names."""
  background = random_background(rng, avoid=set())
  shapes: list[Shape] = []
  target = int(rng.integers(min_shapes, max_shapes + 1))
  for _ in range(3 * target):
    if len(shapes) == target:
      break
    shape = random_shape(rng, shapes, avoid_colors=set(background.colors))
    if shape is not None:
      shapes.append(shape)
  return Scene(background, tuple(shapes))
