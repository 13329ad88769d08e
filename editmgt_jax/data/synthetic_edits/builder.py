"""`synthetic_edits`: procedurally generated instruction edits with exact ground-truth masks.

The TFDS builder: examples from `editmgt_jax.data.synthetic_edits.edits.generate_example`, images
stored as PNG in ArrayRecord. Build with `python -m train.build_dataset synthetic_edits`.
"""

from __future__ import annotations

import dataclasses
import io
import multiprocessing

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from editmgt_jax.data.categories import EDIT_CATEGORIES
from editmgt_jax.data.synthetic_edits.edits import generate_example


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
