"""Encode a dataset's images to VQ token ids once, so training does not re-encode them every epoch.

Reads the dataset in record order through the same decode and centre-crop as the training pipeline
(`crop='center'`; random crops cannot be pre-computed), encodes source and target with an
`encode_fn(pixels) -> ids` (e.g. a jitted `VQModel.encode_ids`: pixels `[B, H, W, 3]` float in
[0, 1] -> ids `[B, h, w] int32`) and writes ArrayRecord shards plus `metadata.json`. Read them back
with `DatasetSpec(tokens_dir=OUT)` in `editmgt_jax.data.pipeline`. The command line is
`python -m train.pretokenize`.

`avgpool_encode_fn` is a stand-in encoder (average pooling by the downsample factor, then uniform
colour quantisation) for tests and pipeline benchmarks; its ids carry no learned meaning.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
from collections.abc import Callable

import numpy as np

EncodeFn = Callable[[np.ndarray], np.ndarray]


def avgpool_encode_fn(factor: int = 16, codebook_size: int = 8192) -> EncodeFn:
  """Stand-in tokenizer: `[B, H, W, 3]` in [0, 1] -> `[B, H/factor, W/factor] int32`.

  Each cell's mean colour is quantised to `L` levels per channel, `L = floor(codebook_size^(1/3))`,
  and the id is `r * L^2 + g * L + b` (always < codebook_size).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  levels = int(math.floor(codebook_size ** (1 / 3) + 1e-9))

  @jax.jit
  def encode(pixels):
    b, h, w, c = pixels.shape
    pooled = pixels.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
    q = jnp.clip(jnp.floor(pooled * levels), 0, levels - 1).astype(jnp.int32)
    return q[..., 0] * levels * levels + q[..., 1] * levels + q[..., 2]

  def fn(pixels: np.ndarray) -> np.ndarray:
    if pixels.shape[1] % factor or pixels.shape[2] % factor:
      raise ValueError(f"avgpool encoder: image size {pixels.shape[1:3]} is not a multiple of {factor}.")
    return np.asarray(encode(jnp.asarray(pixels)))

  return fn


def vq_encode_fn(model) -> EncodeFn:
  """Wraps a `VQModel` (anything with `encode_ids(pixels) -> ids`) in one jitted function.

  The module is split once into graph and state; the jitted function merges them inside, so the
  Python-side module is never traced again (`nnx.jit` would re-check it on every call).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  graphdef, state = nnx.split(model)

  @jax.jit
  def encode(state, pixels):
    return nnx.merge(graphdef, state).encode_ids(pixels).astype(jnp.int32)

  return lambda pixels: np.asarray(encode(state, jnp.asarray(pixels, jnp.float32)))


def load_vq(loader: str, checkpoint: str):
  """Calls `module:function` (e.g. a converted-checkpoint loader) with `checkpoint`; returns the model."""
  module_name, _, fn_name = loader.partition(":")
  if not fn_name:
    raise ValueError(f"--vq-loader must look like 'package.module:function', got {loader!r}.")
  try:
    fn = getattr(importlib.import_module(module_name), fn_name)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"--vq-loader {loader!r}: cannot import it ({e}).") from e
  return fn(checkpoint)


def _image_batches(dataset: str, split: str, data_dir: str | None, resolution: int,
                   batch_size: int, limit: int | None):
  """(iterator over lists of decoded, centre-cropped examples in record order, number of examples)."""
  import grain  # pylint: disable=g-import-not-at-top
  from editmgt_jax.data import pipeline, sources, transforms  # pylint: disable=g-import-not-at-top

  source, _ = sources.tfds_source(
      pipeline.DatasetSpec(name=dataset, split=split, data_dir=data_dir)
  )
  ds = grain.MapDataset.source(source)
  if limit is not None:
    ds = ds[:limit]
  decode = transforms.DecodeAndCrop(resolution, "center")
  ds = (
      ds.map_with_index(transforms.Standardize(0, False, len(source)))
      .map(lambda ex: decode(ex, None))  # centre crops draw no random numbers
      .batch(batch_size, drop_remainder=False, batch_fn=list)
  )
  total = len(source) if limit is None else min(limit, len(source))
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)), total


def pretokenize(
    dataset: str,
    out_dir: str,
    encode_fn: EncodeFn,
    *,
    split: str = "train",
    data_dir: str | None = None,
    resolution: int = 256,
    batch_size: int = 32,
    num_shards: int = 1,
    limit: int | None = None,
    encoder_description: str = "",
    progress: bool = True,
) -> dict:
  """Encodes `dataset[split]` with `encode_fn` and writes ArrayRecord shards + `metadata.json`.

  Atomic: the records are written into a temporary sibling of `out_dir` that replaces it when
  complete, so a failed or killed run leaves `out_dir` as it was. An existing `out_dir` is
  replaced only when it is empty or a pre-tokenised dataset (has `metadata.json`).

  Args:
    dataset: TFDS name with config, e.g. `synthetic_edits/default`.
    out_dir: output directory (created, or replaced as above).
    encode_fn: pixels `[B, R, R, 3] float32` in [0, 1] -> ids `[B, h, w]` int. Called with a fixed
      batch size (the last batch is padded), so a jitted encoder compiles once.
    resolution: side of the centre crops that are encoded.
    num_shards: ArrayRecord files to spread the records over (contiguous ranges).
    limit: encode only the first `limit` records.

  Returns:
    The metadata dict that was written.
  """
  from editmgt_jax.folders import writing_folder  # pylint: disable=g-import-not-at-top

  check_out_dir(out_dir)
  batches, total = _image_batches(dataset, split, data_dir, resolution, batch_size, limit)
  if total == 0:
    raise ValueError(f"{dataset}[{split}] has no examples to encode.")
  with writing_folder(out_dir) as tmp:
    return _write(tmp, batches, total, encode_fn, dataset=dataset, split=split, data_dir=data_dir,
                  resolution=resolution, batch_size=batch_size, num_shards=num_shards,
                  encoder_description=encoder_description, progress=progress)


def check_out_dir(out_dir: str) -> None:
  """`ValueError` unless `out_dir` may be (re)written: absent, an empty folder, or a pre-tokenised
  dataset (a folder with `metadata.json`); never a file or a folder holding anything else."""
  from editmgt_jax.data.sources import TOKENS_METADATA  # pylint: disable=g-import-not-at-top
  from editmgt_jax.folders import unwritable  # pylint: disable=g-import-not-at-top

  if os.path.exists(out_dir):
    if not os.path.isdir(out_dir):
      raise ValueError(f"--out {out_dir}: is a file, not a folder")
    if os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, TOKENS_METADATA)):
      raise ValueError(f"--out {out_dir}: exists and is not a pre-tokenised dataset (no {TOKENS_METADATA}); "
                       "not replacing it, choose another folder")
  why = unwritable(out_dir, folder=True)
  if why:
    raise ValueError(f"--out {out_dir}: {why}")


def _write(out_dir, batches, total, encode_fn, *, dataset, split, data_dir, resolution, batch_size,
           num_shards, encoder_description, progress) -> dict:
  """Encode every batch and write the shards and metadata.json into `out_dir`."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  from editmgt_jax.data.sources import TOKENS_METADATA, serialize_token_record  # pylint: disable=g-import-not-at-top

  num_shards = max(1, min(num_shards, total))
  per_shard = math.ceil(total / num_shards)
  files = [f"tokens-{split}.array_record-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]
  writers = [
      array_record_module.ArrayRecordWriter(os.path.join(out_dir, f), "group_size:1") for f in files
  ]
  written, grid = 0, None
  start = time.time()
  bar = tqdm(total=total, desc=f"tokenising {dataset}[{split}]", unit="ex", disable=not progress)
  try:
    for examples in batches:
      n = len(examples)
      halves = []
      for key in ("source", "target"):
        images = np.stack([e[key] for e in examples]).astype(np.float32) / 255
        # Pad to the fixed batch size so a jitted encoder compiles once.
        halves.append(np.pad(images, ((0, batch_size - n), (0, 0), (0, 0), (0, 0))))
      pixels = np.concatenate(halves)
      ids = np.asarray(encode_fn(pixels))
      if ids.ndim != 3 or ids.shape[0] != 2 * batch_size:
        raise ValueError(f"encode_fn returned shape {ids.shape}, expected [{2 * batch_size}, h, w].")
      grid = ids.shape[1:]
      src_ids, tgt_ids = ids[:batch_size], ids[batch_size:]
      for i, e in enumerate(examples):
        record = serialize_token_record(src_ids[i], tgt_ids[i], e["category"], _text(e["instruction"]))
        writers[written // per_shard].write(record)
        written += 1
      bar.update(n)
  finally:
    bar.close()
    for w in writers:
      w.close()
  metadata = {
      "dataset": dataset,
      "split": split,
      "data_dir": data_dir,
      "num_examples": written,
      "resolution": resolution,
      "grid": list(grid),
      "encoder": encoder_description,
      "files": files,
      "seconds": round(time.time() - start, 2),
  }
  with open(os.path.join(out_dir, TOKENS_METADATA), "w") as f:
    json.dump(metadata, f, indent=1)
  return metadata


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)
