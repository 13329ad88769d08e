"""Edits of `synthetic_edits`: one per CrispEdit category, with its instruction, and the examples.

  ==================  =====================================================================
  add                 a new shape appears:          "add a small yellow star in the top right"
  remove              a shape disappears:           "remove the green square"
  replace             a shape becomes another:      "turn the red circle into a blue triangle"
  color               a shape changes colour:       "make the red circle blue"
  background change   a new background:             "turn the background yellow"
  style               a whole-image transform:      "make it pixel art", "invert the colors"
  motion change       a shape moves or rotates:     "move the purple hexagon to the left"
  ==================  =====================================================================

Every example is a pure function of (seed, split, index): a NumPy `Generator` seeded with
`[seed, split, index]` drives all choices, so examples can be made in any order or in parallel.
Categories cycle with the index (`index % 7`), so every split is balanced. Instructions come from a
closed word list, `SYNTHETIC_VOCAB`, for the word-level tokenizer in
`editmgt_jax.models.text.word_tokenizer`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from editmgt_jax.data.categories import EDIT_CATEGORIES
from editmgt_jax.data.synthetic_edits.render import apply_style, render
from editmgt_jax.data.synthetic_edits.scene import (
    ANGLES, COLORS, MOVES, POSITION_PHRASES, SHAPES, SIZE_RANGES, STYLES, SYMMETRY, Scene, Shape, choice,
    fits, position_phrase, random_background, random_scene, random_shape)

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
  fills = [*COLORS, *SHAPES, *SIZE_RANGES, "big", "a", "an", "horizontal", "vertical",
           "clockwise", "counterclockwise", *map(str, ANGLES)]
  for phrase in [*sum(POSITION_PHRASES, ()), *MOVES]:
    fills.extend(phrase.split())
  words.update(fills)
  return tuple(sorted(words))


# The closed word list of every instruction this module can produce.
SYNTHETIC_VOCAB: tuple[str, ...] = _vocabulary()


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


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
  shape = random_shape(rng, scene.shapes, avoid_colors=set(scene.background.colors))
  if shape is None:
    return None
  size_word = {"small": "small", "large": choice(rng, ("large", "big"))}[shape.size]
  obj = f"{size_word} {shape.name}" if rng.random() < 0.5 else shape.name
  text = choice(rng, TEMPLATES["add"]).format(
      a=_article(obj), obj=obj, pos=position_phrase(shape.cx, shape.cy)
  )
  return Edit(Scene(scene.background, scene.shapes + (shape,)), text)


def _edit_remove(rng, scene: Scene) -> Edit | None:
  i = int(rng.integers(len(scene.shapes)))
  text = choice(rng, TEMPLATES["remove"]).format(ref=_reference(rng, scene.shapes[i]))
  return Edit(Scene(scene.background, scene.shapes[:i] + scene.shapes[i + 1 :]), text)


def _edit_replace(rng, scene: Scene) -> Edit | None:
  i = int(rng.integers(len(scene.shapes)))
  old = scene.shapes[i]
  kind = choice(rng, tuple(k for k in SHAPES if k != old.kind))
  color = old.color
  if rng.random() < 0.5:
    color = choice(rng, tuple(c for c in COLORS if c not in scene.background.colors))
  new = dataclasses.replace(old, kind=kind, color=color, angle=0.0)
  if new.name in scene.names:
    return None
  new_words = new.name if color != old.color or rng.random() < 0.5 else kind
  text = choice(rng, TEMPLATES["replace"]).format(
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
  new = dataclasses.replace(old, color=choice(rng, options))
  text = choice(rng, TEMPLATES["color"]).format(ref=_reference(rng, old), color=new.color)
  shapes = list(scene.shapes)
  shapes[i] = new
  return Edit(Scene(scene.background, tuple(shapes)), text)


def _edit_background(rng, scene: Scene) -> Edit | None:
  bg = random_background(rng, avoid=scene.used_colors)
  if bg == scene.background:
    return None
  c1, c2 = bg.colors[0], bg.colors[-1]
  text = choice(rng, TEMPLATES[f"background {bg.kind}"]).format(c1=c1, c2=c2, orient=bg.orient)
  return Edit(Scene(bg, scene.shapes), text)


def _edit_style(rng, scene: Scene) -> Edit | None:
  style = choice(rng, STYLES)
  return Edit(scene, choice(rng, TEMPLATES[f"style {style}"]), style=style)


def _edit_motion(rng, scene: Scene) -> Edit | None:
  i = int(rng.integers(len(scene.shapes)))
  old = scene.shapes[i]
  others = scene.shapes[:i] + scene.shapes[i + 1 :]
  ref = _reference(rng, old, with_position=False)
  if old.kind != "circle" and rng.random() < 0.5:
    order = SYMMETRY[old.kind]
    angles = [a for a in ANGLES if a % (360 / order) != 0]
    angle = choice(rng, angles)
    if angle == 180:
      new = dataclasses.replace(old, angle=old.angle + 180)
      text = choice(rng, TEMPLATES["motion flip"]).format(ref=ref)
    else:
      turn = choice(rng, ("clockwise", "counterclockwise"))
      # Screen y points down, so a growing angle turns clockwise.
      new = dataclasses.replace(old, angle=old.angle + (angle if turn == "clockwise" else -angle))
      text = choice(rng, TEMPLATES["motion rotate"]).format(ref=ref, angle=angle, turn=turn)
  else:
    moves = list(MOVES)
    for k in rng.permutation(len(moves)):
      dx, dy = MOVES[moves[k]]
      step = float(rng.uniform(0.15, 0.3))
      cx, cy = old.cx + dx * step, old.cy + dy * step
      if fits(cx, cy, old.radius, others):
        break
    else:
      return None
    new = dataclasses.replace(old, cx=cx, cy=cy)
    text = choice(rng, TEMPLATES["motion move"]).format(ref=ref, move=moves[k])
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
