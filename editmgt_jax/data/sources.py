"""Where the pipeline's records come from: built TFDS datasets, and pre-tokenised ArrayRecord files.

`tfds_source` opens a split of a built TFDS dataset with its images still encoded (decoded later, in
the pipeline's map, where the crop size is known). Pre-tokenised datasets (written by
`python -m train.pretokenize`) are ArrayRecord files of `serialize_token_record` bytes beside a
`metadata.json`; `token_source` opens them.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import grain
import numpy as np

if TYPE_CHECKING:
  from editmgt_jax.data.pipeline import DatasetSpec

IMAGE_FEATURES = ("source_image", "target_image")

# ---------------------------------------------------------------------------------------------
# Pre-tokenised records (written by train.pretokenize).

TOKENS_METADATA = "metadata.json"


_TOKEN_MAGIC = b"EMT1"


def serialize_token_record(
    source_ids: np.ndarray, target_ids: np.ndarray, category: int, instruction: str
) -> bytes:
  """One pre-tokenised example as bytes.

  Layout: `b"EMT1"`, a little-endian uint32 header length, a JSON header (`grid`, `category`,
  `instruction`), then source and target ids as little-endian int32 in row-major order. Parsing is
  a couple of `np.frombuffer` calls, no pickle and no zip.
  """
  source_ids = np.asarray(source_ids, "<i4")
  target_ids = np.asarray(target_ids, "<i4")
  if source_ids.shape != target_ids.shape or source_ids.ndim != 2:
    raise ValueError(f"token grids must be equal 2-D shapes, got {source_ids.shape} and {target_ids.shape}.")
  header = json.dumps(
      {"grid": list(source_ids.shape), "category": int(category), "instruction": instruction}
  ).encode()
  return b"".join([
      _TOKEN_MAGIC, np.uint32(len(header)).astype("<u4").tobytes(), header,
      source_ids.tobytes(), target_ids.tobytes(),
  ])


def parse_token_record(data: bytes) -> dict[str, Any]:
  """Inverse of `serialize_token_record`: ids `[h, w] int32`, category int, instruction str."""
  if data[:4] != _TOKEN_MAGIC:
    raise ValueError("not a pre-tokenised record (bad magic); rewrite it with train.pretokenize.")
  n = int(np.frombuffer(data, "<u4", 1, 4)[0])
  header = json.loads(data[8 : 8 + n])
  h, w = header["grid"]
  ids = np.frombuffer(data, "<i4", 2 * h * w, 8 + n).astype(np.int32).reshape(2, h, w)
  return {
      "source_ids": ids[0],
      "target_ids": ids[1],
      "category": header["category"],
      "instruction": header["instruction"],
  }


def token_source(spec: DatasetSpec):
  """`(ArrayRecord source of a pre-tokenised dataset, its metadata)`."""
  meta_path = os.path.join(spec.tokens_dir, TOKENS_METADATA)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(
        f"{meta_path} not found: {spec.tokens_dir} is not a pre-tokenised dataset "
        "(write one with `python -m train.pretokenize`)."
    )
  with open(meta_path) as f:
    meta = json.load(f)
  files = [os.path.join(spec.tokens_dir, name) for name in meta["files"]]
  return grain.sources.ArrayRecordDataSource(files), meta


# ---------------------------------------------------------------------------------------------
# TFDS sources.


def build_command(spec: DatasetSpec) -> str:
  """The `train.build_dataset` command that builds `spec` (its config name and data dir included)."""
  import re  # pylint: disable=g-import-not-at-top

  name, _, config = spec.name.partition("/")
  data_dir = spec.data_dir or "DIR"
  custom = re.fullmatch(r"r(\d+)_n(\d+)_t(\d+)_s(\d+)", config) if name == "synthetic_edits" else None
  if custom:
    r, n, t, seed = custom.groups()
    return (f"python -m train.build_dataset synthetic_edits --data-dir {data_dir} --resolution {r} "
            f"--num-examples {n} --num-test {t} --seed {seed}")
  return (f"python -m train.build_dataset {spec.name} --data-dir {data_dir}"
          + (" --manual-dir RAW" if name == "crispedit" else ""))


def tfds_source(spec: DatasetSpec):
  """`(random-access source of spec.split with the images still encoded, whether it has edit masks)`
  for a built TFDS dataset; a missing dataset or split raises an error naming it."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from editmgt_jax.data.builders import register_builders  # pylint: disable=g-import-not-at-top

  register_builders()

  try:
    builder = tfds.builder(spec.name, data_dir=spec.data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(
        f"dataset {spec.name!r} is not built in {spec.data_dir or 'the default TFDS data dir'}; "
        f"build it with `{build_command(spec)}`"
    ) from None
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"dataset {spec.name!r} is not built in {spec.data_dir or builder.data_dir}; "
        f"build it with `{build_command(spec)}`"
    )
  features = builder.info.features
  missing = [k for k in (*IMAGE_FEATURES, "instruction", "category") if k not in features]
  if missing:
    raise ValueError(f"dataset {spec.name!r} lacks the feature(s) {missing} the pipeline needs.")
  # Images stay encoded here and are decoded in the pipeline's map, where the crop size is known.
  decoders = {k: tfds.decode.SkipDecoding() for k in (*IMAGE_FEATURES, "edit_mask") if k in features}
  try:
    source = builder.as_data_source(split=spec.split, decoders=decoders)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"dataset {spec.name!r}: split {spec.split!r} not available "
        f"(splits: {list(builder.info.splits)}): {e}"
    ) from e
  return source, "edit_mask" in features

