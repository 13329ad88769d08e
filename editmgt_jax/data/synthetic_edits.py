"""`synthetic_edits`: procedurally generated instruction edits with exact ground-truth masks.

Each example is a flat-shaded scene (a solid, gradient, striped or checkered background with one to
four shapes: circle, square, triangle, star, ellipse, hexagon, in twelve named colours, two size
classes, nine named positions) and one edit in each of the seven CrispEdit categories:

  ==================  =====================================================================
  add                 a new shape appears:          "add a small yellow star in the top right"
  remove              a shape disappears:           "remove the green square"
  replace             a shape becomes another:      "turn the red circle into a blue triangle"
  color               a shape changes colour:       "make the red circle blue"
  background change   a new background:             "turn the background yellow"
  style               a whole-image transform:      "make it pixel art", "invert the colors"
  motion change       a shape moves or rotates:     "move the purple hexagon to the left"
  ==================  =====================================================================

Rendering uses PIL without antialiasing, so pixels are exactly one colour or another and
`edit_mask` (255 where the edit changed a pixel, 0 elsewhere) equals `any(source != target)` over the
channels, exactly. Every example is a pure function of (seed, split, index): a NumPy `Generator`
seeded with `[seed, split, index]` drives all choices, so examples can be made in any order or in
parallel. Categories cycle with the index (`index % 7`), so every split is balanced.

Instructions come from a closed word list, `SYNTHETIC_VOCAB`, for the word-level tokenizer in
`editmgt_jax.data.text`.
"""

from __future__ import annotations

import dataclasses
import io
import math
import multiprocessing
import re
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw, ImageOps

from editmgt_jax.data.crispedit import EDIT_CATEGORIES

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
_SYMMETRY = {"square": 4, "triangle": 3, "star": 5, "ellipse": 2, "hexagon": 6}
_ANGLES = (45, 90, 180)
_SIZE_RANGES = {"small": (0.07, 0.10), "large": (0.13, 0.17)}
# Minimum gap between shapes and from the border, as a fraction of the image side.
_GAP = 0.02

_POSITION_PHRASES = (
    ("in the top left", "at the top", "in the top right"),
    ("on the left", "in the center", "on the right"),
    ("in the bottom left", "at the bottom", "in the bottom right"),
)
_MOVES = {"to the left": (-1, 0), "to the right": (1, 0), "up": (0, -1), "down": (0, 1)}

TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": (
        "add {a} {obj} {pos}",
        "put {a} {obj} {pos}",
        "draw {a} {obj} {pos}",
        "place {a} {obj} {pos}",
        "insert {a} {obj} {pos}",
        "there should be {a} {obj} {pos}",
    ),
    "remove": (
        "remove the {ref}",
        "delete the {ref}",
        "erase the {ref}",
        "take away the {ref}",
        "get rid of the {ref}",
        "take out the {ref}",
    ),
    "replace": (
        "replace the {ref} with {a} {new}",
        "turn the {ref} into {a} {new}",
        "change the {ref} into {a} {new}",
        "swap the {ref} for {a} {new}",
        "make the {ref} {a} {new}",
    ),
    "color": (
        "make the {ref} {color}",
        "change the color of the {ref} to {color}",
        "change the colour of the {ref} to {color}",
        "paint the {ref} {color}",
        "color the {ref} {color}",
        "turn the {ref} {color}",
        "recolor the {ref} {color}",
    ),
    "background solid": (
        "turn the background {c1}",
        "make the background {c1}",
        "change the background to {c1}",
        "paint the background {c1}",
        "change the background color to {c1}",
        "use a plain {c1} background",
    ),
    "background gradient": (
        "make the background a gradient from {c1} to {c2}",
        "change the background to a {c1} to {c2} gradient",
        "give the image a {c1} to {c2} gradient background",
    ),
    "background stripes": (
        "make the background {orient} {c1} and {c2} stripes",
        "change the background to {orient} {c1} and {c2} stripes",
        "give the picture a background of {orient} {c1} and {c2} stripes",
    ),
    "background checkerboard": (
        "make the background a {c1} and {c2} checkerboard",
        "change the background to a {c1} and {c2} checkerboard",
        "use a {c1} and {c2} checkered background",
    ),
    "style pixelate": (
        "pixelate the image",
        "make it pixel art",
        "turn the picture into pixel art",
        "make the image look pixelated",
    ),
    "style grayscale": (
        "make it black and white",
        "make the image grayscale",
        "convert the picture to grayscale",
        "turn the image black and white",
    ),
    "style invert": (
        "invert the colors",
        "invert the colours of the image",
        "make it look like a photo negative",
    ),
    "style posterize": (
        "posterize the image",
        "reduce the number of colors",
        "make it look posterized",
    ),
    "style outline": (
        "turn it into a line drawing",
        "make it a sketch",
        "draw only the outlines",
        "turn the image into an outline sketch",
    ),
    "motion move": (
        "move the {ref} {move}",
        "shift the {ref} {move}",
        "slide the {ref} {move}",
        "push the {ref} {move}",
    ),
    "motion rotate": (
        "rotate the {ref} {angle} degrees {turn}",
        "turn the {ref} {angle} degrees {turn}",
        "rotate the {ref} by {angle} degrees {turn}",
    ),
    "motion flip": (
        "turn the {ref} upside down",
        "flip the {ref} upside down",
        "rotate the {ref} by 180 degrees",
    ),
}


def _vocabulary() -> tuple[str, ...]:
  words = set()
  for templates in TEMPLATES.values():
    for t in templates:
      words.update(re.sub(r"\{\w+\}", " ", t).split())
  fills = [*COLORS, *SHAPES, *_SIZE_RANGES, "big", "a", "an", "horizontal", "vertical",
           "clockwise", "counterclockwise", *map(str, _ANGLES)]
  for phrase in [*sum(_POSITION_PHRASES, ()), *_MOVES]:
    fills.extend(phrase.split())
  words.update(fills)
  return tuple(sorted(words))


# The closed word list of every instruction this module can produce.
SYNTHETIC_VOCAB: tuple[str, ...] = _vocabulary()


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


# --------------------------------------------------------------------------------------------
# Rendering


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


# --------------------------------------------------------------------------------------------
# Scene and edit sampling


def position_phrase(cx: float, cy: float) -> str:
  """Name of the cell of a 3x3 grid that holds the point (fractions of the side)."""
  return _POSITION_PHRASES[min(int(cy * 3), 2)][min(int(cx * 3), 2)]


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _choice(rng: np.random.Generator, options: Sequence):
  return options[int(rng.integers(len(options)))]


def _fits(cx: float, cy: float, radius: float, others: Sequence[Shape]) -> bool:
  if not (radius + _GAP <= cx <= 1 - radius - _GAP and radius + _GAP <= cy <= 1 - radius - _GAP):
    return False
  return all(math.hypot(cx - o.cx, cy - o.cy) >= radius + o.radius + _GAP for o in others)


def _place(rng: np.random.Generator, radius: float, others: Sequence[Shape]):
  for _ in range(30):
    cx, cy = rng.uniform(radius + _GAP, 1 - radius - _GAP, size=2)
    if _fits(cx, cy, radius, others):
      return float(cx), float(cy)
  return None


def _random_background(rng: np.random.Generator, avoid: set[str]) -> Background:
  kind = _choice(rng, BACKGROUNDS)
  palette = [c for c in COLORS if c not in avoid]
  n = 1 if kind == "solid" else 2
  colors = tuple(palette[i] for i in rng.choice(len(palette), n, replace=False))
  return Background(
      kind=kind,
      colors=colors,
      orient=_choice(rng, ("horizontal", "vertical")),
      period=float(rng.uniform(0.08, 0.2)),
  )


def _random_shape(rng, others: Sequence[Shape], avoid_colors: set[str]) -> Shape | None:
  names = {o.name for o in others}
  size = _choice(rng, tuple(_SIZE_RANGES))
  radius = float(rng.uniform(*_SIZE_RANGES[size]))
  where = _place(rng, radius, others)
  if where is None:
    return None
  for _ in range(20):
    kind, color = _choice(rng, SHAPES), _choice(rng, tuple(COLORS))
    if color not in avoid_colors and f"{color} {kind}" not in names:
      return Shape(kind, color, where[0], where[1], radius, size)
  return None


def random_scene(rng: np.random.Generator, min_shapes: int = 1, max_shapes: int = 4) -> Scene:
  """A background and `min_shapes..max_shapes` non-overlapping shapes with unique names."""
  background = _random_background(rng, avoid=set())
  shapes: list[Shape] = []
  target = int(rng.integers(min_shapes, max_shapes + 1))
  for _ in range(3 * target):
    if len(shapes) == target:
      break
    shape = _random_shape(rng, shapes, avoid_colors=set(background.colors))
    if shape is not None:
      shapes.append(shape)
  return Scene(background, tuple(shapes))


@dataclasses.dataclass(frozen=True)
class Edit:
  target: Scene
  instruction: str
  style: str | None = None


def _reference(rng, shape: Shape, with_position: bool = True) -> str:
  if with_position and rng.random() < 0.3:
    return f"{shape.name} {position_phrase(shape.cx, shape.cy)}"
  return shape.name


def _edit_add(rng, scene: Scene) -> Edit | None:
  if len(scene.shapes) >= 4:
    return None
  shape = _random_shape(rng, scene.shapes, avoid_colors=set(scene.background.colors))
  if shape is None:
    return None
  size_word = {"small": "small", "large": _choice(rng, ("large", "big"))}[shape.size]
  obj = f"{size_word} {shape.name}" if rng.random() < 0.5 else shape.name
  text = _choice(rng, TEMPLATES["add"]).format(
      a=_article(obj), obj=obj, pos=position_phrase(shape.cx, shape.cy)
  )
  return Edit(Scene(scene.background, scene.shapes + (shape,)), text)


def _edit_remove(rng, scene: Scene) -> Edit | None:
  i = int(rng.integers(len(scene.shapes)))
  text = _choice(rng, TEMPLATES["remove"]).format(ref=_reference(rng, scene.shapes[i]))
  return Edit(Scene(scene.background, scene.shapes[:i] + scene.shapes[i + 1 :]), text)


def _edit_replace(rng, scene: Scene) -> Edit | None:
  i = int(rng.integers(len(scene.shapes)))
  old = scene.shapes[i]
  kind = _choice(rng, tuple(k for k in SHAPES if k != old.kind))
  color = old.color
  if rng.random() < 0.5:
    color = _choice(rng, tuple(c for c in COLORS if c not in scene.background.colors))
  new = dataclasses.replace(old, kind=kind, color=color, angle=0.0)
  if new.name in scene.names:
    return None
  new_words = new.name if color != old.color or rng.random() < 0.5 else kind
  text = _choice(rng, TEMPLATES["replace"]).format(
      ref=_reference(rng, old), a=_article(new_words), new=new_words
  )
  shapes = list(scene.shapes)
  shapes[i] = new
  return Edit(Scene(scene.background, tuple(shapes)), text)


def _edit_color(rng, scene: Scene) -> Edit | None:
  i = int(rng.integers(len(scene.shapes)))
  old = scene.shapes[i]
  options = tuple(
      c for c in COLORS
      if c != old.color and c not in scene.background.colors and f"{c} {old.kind}" not in scene.names
  )
  if not options:
    return None
  new = dataclasses.replace(old, color=_choice(rng, options))
  text = _choice(rng, TEMPLATES["color"]).format(ref=_reference(rng, old), color=new.color)
  shapes = list(scene.shapes)
  shapes[i] = new
  return Edit(Scene(scene.background, tuple(shapes)), text)


def _edit_background(rng, scene: Scene) -> Edit | None:
  bg = _random_background(rng, avoid=scene.used_colors)
  if bg == scene.background:
    return None
  c1, c2 = bg.colors[0], bg.colors[-1]
  text = _choice(rng, TEMPLATES[f"background {bg.kind}"]).format(c1=c1, c2=c2, orient=bg.orient)
  return Edit(Scene(bg, scene.shapes), text)


def _edit_style(rng, scene: Scene) -> Edit | None:
  style = _choice(rng, STYLES)
  return Edit(scene, _choice(rng, TEMPLATES[f"style {style}"]), style=style)


def _edit_motion(rng, scene: Scene) -> Edit | None:
  i = int(rng.integers(len(scene.shapes)))
  old = scene.shapes[i]
  others = scene.shapes[:i] + scene.shapes[i + 1 :]
  ref = _reference(rng, old, with_position=False)
  if old.kind != "circle" and rng.random() < 0.5:
    order = _SYMMETRY[old.kind]
    angles = [a for a in _ANGLES if a % (360 / order) != 0]
    angle = _choice(rng, angles)
    if angle == 180:
      new = dataclasses.replace(old, angle=old.angle + 180)
      text = _choice(rng, TEMPLATES["motion flip"]).format(ref=ref)
    else:
      turn = _choice(rng, ("clockwise", "counterclockwise"))
      # Screen y points down, so a growing angle turns clockwise.
      new = dataclasses.replace(old, angle=old.angle + (angle if turn == "clockwise" else -angle))
      text = _choice(rng, TEMPLATES["motion rotate"]).format(ref=ref, angle=angle, turn=turn)
  else:
    moves = list(_MOVES)
    for k in rng.permutation(len(moves)):
      dx, dy = _MOVES[moves[k]]
      step = float(rng.uniform(0.15, 0.3))
      cx, cy = old.cx + dx * step, old.cy + dy * step
      if _fits(cx, cy, old.radius, others):
        break
    else:
      return None
    new = dataclasses.replace(old, cx=cx, cy=cy)
    text = _choice(rng, TEMPLATES["motion move"]).format(ref=ref, move=moves[k])
  shapes = list(scene.shapes)
  shapes[i] = new
  return Edit(Scene(scene.background, tuple(shapes)), text)


_EDITORS: dict[str, Callable[[np.random.Generator, Scene], Edit | None]] = {
    "add": _edit_add,
    "background change": _edit_background,
    "color": _edit_color,
    "motion change": _edit_motion,
    "remove": _edit_remove,
    "replace": _edit_replace,
    "style": _edit_style,
}
_SPLIT_STREAMS = {"train": 0, "test": 1}
_MAX_ATTEMPTS = 50


def generate_example(index: int, *, split: str = "train", resolution: int = 128, seed: int = 0) -> dict:
  """The example `index` of `split`, as arrays.

  Returns:
    dict with `source_image`, `target_image` (`[R, R, 3] uint8`), `edit_mask` (`[R, R] bool`, equal
    to `any(source != target, -1)`), `instruction` (str) and `category` (str, one of
    `EDIT_CATEGORIES`).
  """
  if split not in _SPLIT_STREAMS:
    raise ValueError(f"split must be one of {tuple(_SPLIT_STREAMS)}, got {split!r}.")
  if resolution < 16:
    raise ValueError(f"resolution must be >= 16 px to draw recognisable shapes, got {resolution}.")
  rng = np.random.default_rng([seed, _SPLIT_STREAMS[split], index])
  category = EDIT_CATEGORIES[index % len(EDIT_CATEGORIES)]
  for _ in range(_MAX_ATTEMPTS):
    scene = random_scene(rng, max_shapes=3 if category == "add" else 4)
    if not scene.shapes:
      continue
    edit = _EDITORS[category](rng, scene)
    if edit is None:
      continue
    source, labels = render(scene, resolution)
    if edit.style is None:
      target, _ = render(edit.target, resolution)
    else:
      target = apply_style(edit.style, source, labels)
    mask = np.any(source != target, axis=-1)
    # An edit that changes no pixel at this resolution (e.g. a tiny shape hidden by rounding) is
    # redrawn, so that every instruction is visible.
    if mask.any():
      return {
          "source_image": source,
          "target_image": target,
          "edit_mask": mask,
          "instruction": edit.instruction,
          "category": category,
      }
  raise RuntimeError(f"synthetic_edits: no visible {category!r} edit for index {index} after "
                     f"{_MAX_ATTEMPTS} attempts (resolution {resolution}).")


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  # Level 1: these flat images compress well anyway, and encoding is the build's bottleneck.
  Image.fromarray(array).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def encode_example(example: dict) -> dict:
  """`generate_example` output -> the TFDS feature dict (PNG bytes)."""
  return {
      "source_image": _png(example["source_image"]),
      "target_image": _png(example["target_image"]),
      "edit_mask": _png(example["edit_mask"].astype(np.uint8) * 255),  # 1-channel PNG
      "instruction": example["instruction"],
      "category": example["category"],
  }


@dataclasses.dataclass
class SyntheticEditsConfig(tfds.core.BuilderConfig):
  """Size and seed of a `synthetic_edits` build.

  Attributes:
    resolution: side of the square images, in pixels.
    num_train: examples in the `train` split.
    num_test: examples in the held-out `test` split (an independent random stream).
    seed: base seed; example `i` of a split depends only on (seed, split, i).
  """

  resolution: int = 128
  num_train: int = 20_000
  num_test: int = 1_000
  seed: int = 0


def config_name(resolution: int, num_train: int, num_test: int, seed: int) -> str:
  """Canonical name of a custom config, e.g. `r64_n1000_t100_s0`."""
  return f"r{resolution}_n{num_train}_t{num_test}_s{seed}"


class SyntheticEdits(tfds.core.GeneratorBasedBuilder):
  """Procedural scenes with instruction edits in the seven CrispEdit categories."""

  name = "synthetic_edits"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      SyntheticEditsConfig(name="default", description="20k train / 1k test at 128 px."),
      SyntheticEditsConfig(
          name="small", description="2k train / 256 test at 64 px, for tests and smoke runs.",
          resolution=64, num_train=2_000, num_test=256,
      ),
  ]

  def __init__(self, *args, num_workers: int = 0, **kwargs):
    """`num_workers` > 1 renders examples in that many processes (the output is identical)."""
    super().__init__(*args, **kwargs)
    self.num_workers = num_workers

  def _info(self) -> tfds.core.DatasetInfo:
    r = self.builder_config.resolution
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict({
            "source_image": tfds.features.Image(shape=(r, r, 3), encoding_format="png"),
            "target_image": tfds.features.Image(shape=(r, r, 3), encoding_format="png"),
            "edit_mask": tfds.features.Image(shape=(r, r, 1), encoding_format="png"),
            "instruction": tfds.features.Text(),
            "category": tfds.features.ClassLabel(names=list(EDIT_CATEGORIES)),
        }),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # everything is generated locally
    c: SyntheticEditsConfig = self.builder_config
    splits = {"train": self._generate_examples("train", c.num_train)}
    if c.num_test > 0:
      splits["test"] = self._generate_examples("test", c.num_test)
    return splits

  def _generate_examples(self, split: str, num_examples: int):
    c: SyntheticEditsConfig = self.builder_config
    jobs = ((i, split, c.resolution, c.seed) for i in range(num_examples))
    if self.num_workers > 1:
      # Spawned, not forked: the parent may hold JAX/absl threads that fork would copy mid-state.
      with multiprocessing.get_context("spawn").Pool(self.num_workers) as pool:
        yield from pool.imap(_keyed_example, jobs, chunksize=64)
    else:
      yield from map(_keyed_example, jobs)


def _keyed_example(job: tuple[int, str, int, int]) -> tuple[int, dict]:
  index, split, resolution, seed = job
  return index, encode_example(
      generate_example(index, split=split, resolution=resolution, seed=seed)
  )
