"""The training input pipeline: TFDS ArrayRecord datasets -> Grain -> batches of numpy arrays.

One call builds the whole pipeline from a `PipelineConfig` (a frozen dataclass; `from_config` also
accepts an `ml_collections.ConfigDict` or a plain mapping with the same fields):

    ds = make_dataset(config, tokenize=WordTokenizer(SYNTHETIC_VOCAB))
    it = iter(ds)
    batch = next(it)

Per dataset, in order: `MapDataset.source(tfds data source)` -> seeded shuffle (a new permutation
each epoch) -> host shard `[process_index::process_count]` -> repeat. Several datasets are then mixed
with weights (`MapDataset.mix`: a deterministic interleave in the given proportions). Each example is
decoded and resized/cropped with one policy applied to source and target, batches are collated
(with optional instruction tokenisation) with `drop_remainder`, and `mp_prefetch` runs all of that in
worker processes.

Batches are dicts of numpy arrays, `B = batch_size`, `R = resolution`:

  * `source`, `target`:  `[B, R, R, 3] uint8` (default; `image_dtype='float32'` gives [0, 1] floats).
    uint8 keeps worker-to-trainer traffic 4x smaller; divide by 255 on the accelerator.
  * `edit_mask`:         `[B, R, R] bool`, True where the edit changed the target; present only when
    every mixed dataset has one (`synthetic_edits` does, CrispEdit does not).
  * `category`:          `[B] int32`, index into `EDIT_CATEGORIES`.
  * `original_size`:     `[B, 2] int32`, (height, width) of the target before resizing.
  * `crop_top_left`:     `[B, 2] int32`, (top, left) of the target crop in resized pixels. These two
    are the model's micro-conditions.
  * the tokenizer's outputs, each `k` as `instruction_<k>` (`WordTokenizer`: `instruction_ids`
    `[B, L] int32` and `instruction_mask` `[B, L] bool`) when `tokenize` is given; raw strings never
    enter a batch.
  * `index` `[B] int64` and `dataset_id` `[B] int32` (record index within its dataset, position of
    the dataset in `config.datasets`) when `config.with_ids` is set.

Pre-tokenised datasets (written by `python -m train.pretokenize`, named by `DatasetSpec.tokens_dir`)
skip decoding and yield `source_ids`, `target_ids` (`[B, h, w] int32`) instead of images.

Exact resume: batch `i` is a pure function of the config and `i`, so the iterator's state is only
the next batch index (`BatchIterator`), whatever the worker count. Save and restore it with Orbax:

    mngr = ocp.CheckpointManager(directory, item_names=("data_iter", ...))
    mngr.save(step, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it), ...))
    mngr.restore(step, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(it)))

A restored iterator yields exactly the batches the uninterrupted one would have, with any
`worker_count` (worker `w` of `W` prepares batches `w, w + W, ...`, and they are read back in order).

Grain worker processes are spawned: scripts that use `worker_count > 0` need an
`if __name__ == "__main__":` guard, and absl programs must parse flags first (`absl.app.run` does;
otherwise call `absl.flags.FLAGS.mark_as_parsed()`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

Tokenize = Callable[[Sequence[str]], Mapping[str, np.ndarray]]

CROP_POLICIES = ("center", "random", "independent")
_IMAGE_FEATURES = ("source_image", "target_image")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One source of examples.

  Attributes:
    name: TFDS name with config, e.g. `synthetic_edits/default` or `crispedit/holdout`.
    split: TFDS split, e.g. `train`, `test`, `validation`, or a slice like `train[:90%]`.
    data_dir: TFDS data dir the dataset was built into (None: TFDS's default).
    weight: relative share of this dataset in a mixture.
    tokens_dir: instead of `name`, a directory written by `train.pretokenize`.
  """

  name: str = ""
  split: str = "train"
  data_dir: str | None = None
  weight: float = 1.0
  tokens_dir: str | None = None

  def describe(self) -> str:
    return self.tokens_dir if self.tokens_dir else f"{self.name}[{self.split}]"


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Everything that determines the stream of batches.

  Attributes:
    datasets: one or more `DatasetSpec`s (mixed by weight when several).
    batch_size: examples per batch on this host; incomplete last batches are dropped.
    resolution: side `R` of the square crops.
    crop: `center` (resize the short side to R, centre crop; both images alike), `random` (same
      random relative crop position for both) or `independent` (each image its own random crop, as
      the official training does).
    image_dtype: `uint8` or `float32` (in [0, 1]).
    seed: seeds shuffling, mixing and random crops.
    shuffle: shuffle each epoch (a new permutation per epoch).
    num_epochs: passes over a single dataset (None: repeat forever). Mixtures always repeat.
    worker_count: worker processes for decoding (0: in the calling process).
    worker_buffer_size: batches each worker prepares ahead.
    read_threads: threads per process that prepare batches concurrently.
    read_buffer_size: batches buffered ahead by those threads.
    with_ids: add `index` and `dataset_id` to batches (for tests and debugging).
  """

  datasets: tuple[DatasetSpec, ...] = ()
  batch_size: int = 16
  resolution: int = 128
  crop: str = "center"
  image_dtype: str = "uint8"
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None
  worker_count: int = 0
  worker_buffer_size: int = 2
  read_threads: int = 4
  read_buffer_size: int = 8
  with_ids: bool = False

  def __post_init__(self):
    if not self.datasets:
      raise ValueError("PipelineConfig.datasets: at least one dataset is required.")
    if self.crop not in CROP_POLICIES:
      raise ValueError(f"PipelineConfig.crop must be one of {CROP_POLICIES}, got {self.crop!r}.")
    if self.image_dtype not in ("uint8", "float32"):
      raise ValueError(f"PipelineConfig.image_dtype must be 'uint8' or 'float32', got {self.image_dtype!r}.")
    if self.batch_size < 1:
      raise ValueError(f"PipelineConfig.batch_size must be >= 1, got {self.batch_size}.")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError(f"PipelineConfig.num_epochs must be None or >= 1, got {self.num_epochs}.")
    for i, d in enumerate(self.datasets):
      if bool(d.name) == bool(d.tokens_dir):
        raise ValueError(f"PipelineConfig.datasets[{i}]: set exactly one of name and tokens_dir.")
      if not d.weight > 0:
        raise ValueError(f"PipelineConfig.datasets[{i}].weight must be > 0, got {d.weight}.")


def from_config(config: Any) -> PipelineConfig:
  """`PipelineConfig` from itself, an `ml_collections.ConfigDict` or a mapping of its fields."""
  if isinstance(config, PipelineConfig):
    return config
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  fields = {f.name for f in dataclasses.fields(PipelineConfig)}
  unknown = set(config) - fields
  if unknown:
    raise ValueError(f"pipeline config: unknown field(s) {sorted(unknown)}; known: {sorted(fields)}.")
  kwargs = dict(config)
  spec_fields = {f.name for f in dataclasses.fields(DatasetSpec)}
  specs = []
  for i, d in enumerate(kwargs.get("datasets", ())):
    if isinstance(d, DatasetSpec):
      specs.append(d)
      continue
    d = d.to_dict() if hasattr(d, "to_dict") else dict(d)
    bad = set(d) - spec_fields
    if bad:
      raise ValueError(f"pipeline config: datasets[{i}] has unknown field(s) {sorted(bad)}.")
    specs.append(DatasetSpec(**d))
  kwargs["datasets"] = tuple(specs)
  return PipelineConfig(**kwargs)


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


def _token_source(spec: DatasetSpec):
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
        f"dataset {spec.name!r} not found in data_dir {spec.data_dir!r} ({e}). Build it with "
        f"`python -m train.build_dataset {spec.name.split('/')[0]} --data-dir DIR`."
    ) from e
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"dataset {spec.name!r} is not built in {builder.data_dir}. Build it with "
        f"`python -m train.build_dataset {spec.name.split('/')[0]} --data-dir DIR`."
    )
  features = builder.info.features
  missing = [k for k in (*_IMAGE_FEATURES, "instruction", "category") if k not in features]
  if missing:
    raise ValueError(f"dataset {spec.name!r} lacks the feature(s) {missing} the pipeline needs.")
  # Images stay encoded here and are decoded in the pipeline's map, where the crop size is known.
  decoders = {k: tfds.decode.SkipDecoding() for k in (*_IMAGE_FEATURES, "edit_mask") if k in features}
  try:
    source = builder.as_data_source(split=spec.split, decoders=decoders)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"dataset {spec.name!r}: split {spec.split!r} not available "
        f"(splits: {list(builder.info.splits)}): {e}"
    ) from e
  return source, "edit_mask" in features


def _shard_index_and_count(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  if shard_index is None or shard_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} is outside [0, shard_count={shard_count}).")
  return shard_index, shard_count


def _derive_seed(*parts: int) -> int:
  """An independent 32-bit seed per (seed, purpose, ...) so that per-epoch seeds never collide."""
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------
# Per-example transforms (run in worker processes: module-level, picklable).


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
class _ParseTokens:
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
    out = {k: v for k, v in example.items() if k not in (*_IMAGE_FEATURES, "edit_mask")}

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
class _Collate:
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


# ---------------------------------------------------------------------------------------------


def _per_host(ds: grain.MapDataset, spec: DatasetSpec, config: PipelineConfig, dataset_id: int,
              shard_index: int, shard_count: int) -> grain.MapDataset:
  """Shuffle, then give this host every `shard_count`-th element of each epoch."""
  n = len(ds)
  if n < shard_count:
    raise ValueError(
        f"dataset {spec.describe()} has {n} examples, fewer than the {shard_count} hosts (shards) "
        "reading it; every host needs at least one. Use a bigger split or fewer hosts."
    )
  if config.shuffle:
    ds = ds.shuffle(seed=_derive_seed(config.seed, 0, dataset_id))
  # Equal shares keep hosts in lockstep; the tail dropped (< shard_count) differs every epoch.
  ds = ds[: n - n % shard_count][shard_index::shard_count]
  if config.num_epochs is not None and len(ds) < config.batch_size:
    raise ValueError(
        f"dataset {spec.describe()}: {len(ds)} examples per host per epoch, fewer than "
        f"batch_size {config.batch_size}, so no complete batch would be produced."
    )
  return ds


def make_map_dataset(
    config: PipelineConfig | Any,
    *,
    tokenize: Tokenize | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.MapDataset:
  """The batched, random-access `MapDataset` (before prefetching); see the module docstring."""
  config = from_config(config)
  shard_index, shard_count = _shard_index_and_count(shard_index, shard_count)
  pretokenised = [bool(d.tokens_dir) for d in config.datasets]
  if any(pretokenised) and not all(pretokenised):
    raise ValueError("PipelineConfig.datasets: pre-tokenised datasets cannot be mixed with image datasets.")
  if len(config.datasets) > 1 and config.num_epochs is not None:
    raise ValueError(
        "PipelineConfig.num_epochs applies to a single dataset; a mixture repeats forever "
        "(bound the run by steps)."
    )

  per_dataset = []
  if all(pretokenised):
    for i, spec in enumerate(config.datasets):
      source, _ = _token_source(spec)
      ds = grain.MapDataset.source(source).map_with_index(_ParseTokens(i, len(source)))
      per_dataset.append(_per_host(ds, spec, config, i, shard_index, shard_count))
  else:
    sources = [tfds_source(spec) for spec in config.datasets]
    keep_mask = all(has_mask for _, has_mask in sources)
    for i, (spec, (source, _)) in enumerate(zip(config.datasets, sources)):
      ds = grain.MapDataset.source(source).map_with_index(Standardize(i, keep_mask, len(source)))
      per_dataset.append(_per_host(ds, spec, config, i, shard_index, shard_count))

  if len(per_dataset) == 1:
    ds = per_dataset[0].repeat(config.num_epochs)
  else:
    weights = [d.weight for d in config.datasets]
    ds = grain.MapDataset.mix([d.repeat(None) for d in per_dataset], weights)

  if not all(pretokenised):
    # Crops are drawn per (host, element index): a fixed function of the position in the stream.
    ds = ds.random_map(
        DecodeAndCrop(config.resolution, config.crop),
        seed=_derive_seed(config.seed, 1, shard_index),
    )
  return ds.batch(
      config.batch_size,
      drop_remainder=True,
      batch_fn=_Collate(tokenize, config.image_dtype, config.with_ids),
  )


def _ensure_absl_flags_parsed() -> None:
  """Grain reads its absl flags when it starts workers; programs without absl never parse them."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class BatchIterator(grain.DatasetIterator):
  """Iterates a batched `MapDataset`; its whole state is the index of the next batch.

  Batch `i` is a pure function of the config and `i`, so a position is all a checkpoint needs, and
  the state does not depend on `worker_count` (Grain's own multiprocess iterator state does). On
  first use, and after `set_state`, it prefetches `batches[next_index:]` with `make_iter`.
  """

  def __init__(self, batches: grain.MapDataset, make_iter: Callable[[grain.MapDataset], grain.IterDataset]):
    super().__init__()
    self._batches = batches
    self._make_iter = make_iter
    self._next_index = 0
    self._inner: grain.DatasetIterator | None = None

  def _start(self) -> grain.DatasetIterator:
    if self._inner is None:
      self._inner = iter(self._make_iter(self._batches[self._next_index :]))
    return self._inner

  def __next__(self) -> dict[str, np.ndarray]:
    if self._closed:
      raise ValueError("BatchIterator: next() on a closed iterator.")
    batch = next(self._start())
    self._next_index += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"next_index": self._next_index}

  def set_state(self, state: dict[str, Any]) -> None:
    if "next_index" not in state:
      raise ValueError(f"BatchIterator: state {state!r} has no 'next_index'.")
    self._close_inner()
    self._next_index = int(state["next_index"])

  def start_prefetch(self) -> None:
    self._start().start_prefetch()

  def _close_inner(self) -> None:
    if self._inner is not None:
      self._inner.close()
      self._inner = None

  def close(self) -> None:
    self._close_inner()
    self._closed = True


class BatchDataset(grain.IterDataset):
  """The pipeline's output: `iter()` gives a checkpointable `BatchIterator`."""

  def __init__(self, batches: grain.MapDataset, config: PipelineConfig):
    super().__init__(batches)
    self.batches = batches
    self.config = config

  def _prefetched(self, batches: grain.MapDataset) -> grain.IterDataset:
    c = self.config
    ds = batches.to_iter_dataset(
        grain.ReadOptions(num_threads=c.read_threads, prefetch_buffer_size=c.read_buffer_size)
    )
    if c.worker_count > 0:
      _ensure_absl_flags_parsed()
      ds = ds.mp_prefetch(
          grain.MultiprocessingOptions(
              num_workers=c.worker_count, per_worker_buffer_size=c.worker_buffer_size
          )
      )
    return ds

  def __iter__(self) -> BatchIterator:
    return BatchIterator(self.batches, self._prefetched)

  def __len__(self) -> int:
    """Batches in the stream (`sys.maxsize` when it repeats forever)."""
    return len(self.batches)


def _ensure_absl_flags_parsed() -> None:
  """Grain reads its absl flags when it starts workers; programs without absl never parse them."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_dataset(
    config: PipelineConfig | Any,
    *,
    tokenize: Tokenize | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> BatchDataset:
  """The pipeline; `iter()` it for a checkpointable iterator of batches.

  Args:
    config: a `PipelineConfig`, `ConfigDict` or mapping of its fields.
    tokenize: `list[str] -> dict of arrays [B, ...]` for the instructions (None: no text in batches).
    shard_index, shard_count: this host's shard (default `jax.process_index()` / `process_count()`).
  """
  config = from_config(config)
  batches = make_map_dataset(config, tokenize=tokenize, shard_index=shard_index, shard_count=shard_count)
  return BatchDataset(batches, config)


__all__ = [
    "CROP_POLICIES",
    "BatchDataset",
    "BatchIterator",
    "DatasetSpec",
    "DecodeAndCrop",
    "PipelineConfig",
    "Standardize",
    "from_config",
    "make_dataset",
    "make_map_dataset",
    "parse_token_record",
    "serialize_token_record",
    "tfds_source",
]
