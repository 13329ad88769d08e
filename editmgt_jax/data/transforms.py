"""Per-example transforms of the pipeline. They run in Grain worker processes, so they are
module-level, picklable frozen dataclasses."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from editmgt_jax.data.sources import IMAGE_FEATURES, parse_token_record

Tokenize = Callable[[Sequence[str]], Mapping[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Standardize:
  """Raw TFDS record -> the common dict every mixed dataset yields."""

  dataset_id: int
  keep_mask: bool
  num_records: int

  def __call__(self, index: int, record: Mapping[str, Any]) -> dict[str, Any]:
    index %= self.num_records  # later epochs ask for index + epoch * num_records
    out = {
        "source_image": record["source_image"],
        "target_image": record["target_image"],
        "instruction": record["instruction"],
        "category": int(record["category"]),
        "index": index,
        "dataset_id": self.dataset_id,
    }
    if self.keep_mask:
      out["edit_mask"] = record["edit_mask"]
    return out


@dataclasses.dataclass(frozen=True)
class ParseTokens:
  """Pre-tokenised record bytes -> the dict the pipeline batches (ids, category, instruction)."""

  dataset_id: int
  num_records: int

  def __call__(self, index: int, data: bytes) -> dict[str, Any]:
    out = parse_token_record(data)
    out["index"] = index % self.num_records
    out["dataset_id"] = self.dataset_id
    return out


def _load_image(data: bytes, resolution: int) -> tuple[Image.Image, tuple[int, int]]:
  """Decodes to RGB with the short side resized to `resolution`; also returns the original (h, w)."""
  with Image.open(io.BytesIO(data)) as im:
    w, h = im.size
    scale = resolution / min(w, h)
    # JPEG: let the decoder downscale by up to 8x while keeping the short side >= resolution.
    im.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
    rgb = _resize_short_side(im.convert("RGB"), resolution, Image.BICUBIC)
  return rgb, (h, w)


def _resize_short_side(im: Image.Image, resolution: int, resample) -> Image.Image:
  w, h = im.size
  scale = resolution / min(w, h)
  size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
  return im if size == im.size else im.resize(size, resample)


def _crop(array: np.ndarray, u: tuple[float, float], resolution: int) -> tuple[np.ndarray, tuple[int, int]]:
  """Crops `[H, W, ...]` to `[R, R, ...]` at relative position `u` in [0, 1]^2."""
  top = int(round(u[0] * (array.shape[0] - resolution)))
  left = int(round(u[1] * (array.shape[1] - resolution)))
  return array[top : top + resolution, left : left + resolution], (top, left)


@dataclasses.dataclass(frozen=True)
class DecodeAndCrop:
  """Decodes both images (and the mask), resizes the short side to R and crops R x R."""

  resolution: int
  crop: str

  def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    r = self.resolution
    if self.crop == "center":
      u_src = u_tgt = (0.5, 0.5)
    elif self.crop == "random":
      u_src = u_tgt = tuple(rng.random(2))
    else:  # independent
      u_src, u_tgt = tuple(rng.random(2)), tuple(rng.random(2))
    out = {k: v for k, v in example.items() if k not in (*IMAGE_FEATURES, "edit_mask")}

    src, _ = _load_image(example["source_image"], r)
    out["source"], _ = _crop(np.asarray(src), u_src, r)
    tgt, original_size = _load_image(example["target_image"], r)
    out["target"], crop_tl = _crop(np.asarray(tgt), u_tgt, r)
    if "edit_mask" in example:
      with Image.open(io.BytesIO(example["edit_mask"])) as im:
        # The mask belongs to the target: same resized size, same crop, nearest neighbour.
        mask = im.convert("L").resize(tgt.size, Image.NEAREST)
        out["edit_mask"], _ = _crop(np.asarray(mask) > 127, u_tgt, r)
    out["original_size"] = np.asarray(original_size, np.int32)
    out["crop_top_left"] = np.asarray(crop_tl, np.int32)
    return out


@dataclasses.dataclass(frozen=True)
class Collate:
  """List of examples -> dict of stacked arrays (+ tokenised instructions)."""

  tokenize: Tokenize | None
  image_dtype: str
  with_ids: bool

  def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    skip = {"instruction"} if self.with_ids else {"instruction", "index", "dataset_id"}
    keys = [k for k in examples[0] if k not in skip]
    batch = {k: np.stack([np.asarray(e[k]) for e in examples]) for k in keys}
    batch["category"] = batch["category"].astype(np.int32)
    if self.with_ids:
      batch["index"] = batch["index"].astype(np.int64)
      batch["dataset_id"] = batch["dataset_id"].astype(np.int32)
    if self.image_dtype == "float32":
      for k in ("source", "target"):
        if k in batch:
          batch[k] = batch[k].astype(np.float32) / np.float32(255)
    if self.tokenize is not None:
      texts = [e["instruction"] for e in examples]
      texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
      batch.update({f"instruction_{k}": np.asarray(v) for k, v in self.tokenize(texts).items()})
    return batch
