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
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from editmgt_jax.data.sources import token_source, tfds_source
from editmgt_jax.data.transforms import Collate, DecodeAndCrop, ParseTokens, Standardize, Tokenize

CROP_POLICIES = ("center", "random", "independent")


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
      source, _ = token_source(spec)
      ds = grain.MapDataset.source(source).map_with_index(ParseTokens(i, len(source)))
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
      batch_fn=Collate(tokenize, config.image_dtype, config.with_ids),
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
    "PipelineConfig",
    "from_config",
    "make_dataset",
    "make_map_dataset",
]
