"""CrispEdit-2M as a TFDS dataset written to ArrayRecord, read from the user's local parquet shards.

CrispEdit-2M (about 2.29M edit pairs, about 4.6 TB, CC-BY-4.0) is distributed as parquet shards
`data/<type>_NNNNN.parquet` with the columns

  * `input_img`:   struct<bytes: binary, path: string>   the source image, encoded (PNG/JPEG)
  * `output_img`:  struct<bytes: binary, path: string>   the edited image
  * `instruction`: string
  * `type`:        string, one of `EDIT_CATEGORIES`

Those names and types are the contract: the builder checks every shard's schema and every shard's
`type` values before it converts a single image, and stops with `CrispEditSchemaError` naming the
file, the column (or row) and what it expected. Extra columns are ignored.

Rows are streamed in small record batches, row group by row group, so a shard never sits whole in
memory. Each image is decoded once with PIL to prove it is readable; the encoded bytes are stored
unchanged (images that are not RGB, e.g. RGBA or palette PNGs, are re-encoded as RGB PNG and counted
as converted). A row whose image is missing or undecodable, or whose instruction is empty, is
skipped: counted by reason and file, logged, and written to `skipped_rows.json` beside the dataset.
Nothing else is dropped.

Unknown `type` values are an error rather than a skip: the shards are split by type, so an unknown
value means the files differ from the published layout, and a silently smaller category is worse than
a stopped build. Values are normalised first (case, surrounding space, `_`/`-` for space), so
`Background_Change` is accepted as `background change`.

Splits: `train`, plus `validation` when `holdout_fraction > 0`. The held-out set is a deterministic
selection of whole parquet row groups (a hash of seed, file name and row-group index), so the two
splits are disjoint, stable across rebuilds and together read every byte only once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from absl import logging
import tensorflow_datasets as tfds
import tqdm

from editmgt_jax.data.categories import EDIT_CATEGORIES
from editmgt_jax.data.crispedit_shards import (MANUAL_DOWNLOAD_INSTRUCTIONS, REQUIRED_COLUMNS, CrispEditSchemaError,
                                               SkipReport, check_image, find_shards, is_held_out,
                                               normalize_category, validate_shard)

# Records per streamed batch: small enough to bound memory at 1024+ px images (~2 x 3 MB a row).
_READ_BATCH_ROWS = 32


@dataclasses.dataclass
class CrispEditConfig(tfds.core.BuilderConfig):
  """Options of the CrispEdit build.

  Attributes:
    holdout_fraction: fraction of parquet row groups held out as the `validation` split (0: none).
    holdout_seed: seed of the row-group hash that picks the held-out groups.
    max_examples: stop after this many rows have been read, in sorted file order (None: all). For
      quick subsets; the skipped rows count towards it.
    decode_check_size: images are decoded at no less than this short side when checked (JPEG
      decoders can skip detail via DCT scaling; the whole entropy-coded stream is still read).
  """

  holdout_fraction: float = 0.0
  holdout_seed: int = 0
  max_examples: int | None = None
  decode_check_size: int = 256


def _image_reason(which: str, error: str) -> str:
  return f"{which} image missing" if error == "missing bytes" else f"{which} image undecodable"


class CrispEdit(tfds.core.GeneratorBasedBuilder):
  """CrispEdit-2M image-edit pairs from local parquet shards."""

  name = "crispedit"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      CrispEditConfig(name="default", description="All rows, `train` split only."),
      CrispEditConfig(
          name="holdout",
          description="0.5% of row groups held out as `validation`.",
          holdout_fraction=0.005,
      ),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def __init__(self, *args, num_threads: int | None = None, **kwargs):
    """`num_threads`: threads that decode-check images (PIL releases the GIL); default: CPU count."""
    super().__init__(*args, **kwargs)
    self.num_threads = num_threads or os.cpu_count() or 1
    self.skip_report = SkipReport()

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="CrispEdit-2M instruction-based image edits (source, target, instruction).",
        features=tfds.features.FeaturesDict({
            "source_image": tfds.features.Image(shape=(None, None, 3)),
            "target_image": tfds.features.Image(shape=(None, None, 3)),
            "instruction": tfds.features.Text(),
            "category": tfds.features.ClassLabel(names=list(EDIT_CATEGORIES)),
            "source_path": tfds.features.Text(),
            "target_path": tfds.features.Text(),
        }),
        supervised_keys=None,
        license="CC-BY-4.0",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    shards = find_shards(dl_manager.manual_dir)
    total = 0
    # Fail fast: every schema and every `type` value is checked before any image is touched.
    for path in tqdm.tqdm(shards, desc="checking shard schemas", unit="shard", leave=False):
      total += validate_shard(path)
    logging.info("CrispEdit: %d shards, %d rows, schemas valid.", len(shards), total)
    self.skip_report = SkipReport()
    config: CrispEditConfig = self.builder_config
    splits = {"train": self._generate_examples(shards, held_out=False)}
    if config.holdout_fraction > 0:
      splits["validation"] = self._generate_examples(shards, held_out=True)
    return splits

  def _row_limits(self, shards: Sequence[str]) -> dict[str, int]:
    """Rows to read from each shard: all of them, or the first `max_examples` in file order."""
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    budget = self.builder_config.max_examples
    limits = {}
    for path in shards:
      n = pq.ParquetFile(path).metadata.num_rows
      limits[path] = n if budget is None else max(0, min(n, budget))
      if budget is not None:
        budget -= limits[path]
    return limits

  def _row_groups(
      self, shards: Sequence[str], limits: dict[str, int], held_out: bool
  ) -> Iterator[tuple[str, int, int]]:
    """(path, row-group index, first row index) of the groups belonging to one split."""
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    config: CrispEditConfig = self.builder_config
    for path in shards:
      meta = pq.ParquetFile(path).metadata
      start = 0
      for rg in range(meta.num_row_groups):
        if start >= limits[path]:
          break
        member = is_held_out(os.path.basename(path), rg, config.holdout_fraction, config.holdout_seed)
        if member == held_out:
          yield path, rg, start
        start += meta.row_group(rg).num_rows

  def _generate_examples(self, shards: Sequence[str], held_out: bool):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    config: CrispEditConfig = self.builder_config
    report = self.skip_report
    limits = self._row_limits(shards)
    size = config.decode_check_size
    check = lambda b: check_image(b, size)  # pylint: disable=unnecessary-lambda-assignment
    with concurrent.futures.ThreadPoolExecutor(self.num_threads) as pool:
      for path, rg, first_row in self._row_groups(shards, limits, held_out):
        name = os.path.basename(path)
        row = first_row
        batches = pq.ParquetFile(path).iter_batches(
            batch_size=_READ_BATCH_ROWS, row_groups=[rg], columns=list(REQUIRED_COLUMNS)
        )
        for batch in batches:
          d = batch.to_pydict()
          n = min(len(d["type"]), limits[path] - row)
          if n <= 0:
            break
          sources = [d["input_img"][i] or {} for i in range(n)]
          targets = [d["output_img"][i] or {} for i in range(n)]
          checked_src = list(pool.map(check, [s.get("bytes") for s in sources]))
          checked_tgt = list(pool.map(check, [t.get("bytes") for t in targets]))
          for i in range(n):
            r = row + i
            report.rows_read += 1
            src, src_converted, src_error = checked_src[i]
            tgt, tgt_converted, tgt_error = checked_tgt[i]
            instruction = (d["instruction"][i] or "").strip()
            if src is None:
              report.add(name, r, _image_reason("source", src_error), src_error)
            elif tgt is None:
              report.add(name, r, _image_reason("target", tgt_error), tgt_error)
            elif not instruction:
              report.add(name, r, "empty instruction")
            else:
              report.converted_to_rgb += int(src_converted) + int(tgt_converted)
              yield f"{name}/{r}", {
                  "source_image": src,
                  "target_image": tgt,
                  "instruction": instruction,
                  "category": normalize_category(d["type"][i]),
                  "source_path": sources[i].get("path") or "",
                  "target_path": targets[i].get("path") or "",
              }
          row += n
    split = "validation" if held_out else "train"
    logging.info("CrispEdit %s split generated. %s", split, report.summary())

  def _download_and_prepare(self, dl_manager, download_config=None):  # pylint: disable=arguments-differ
    result = super()._download_and_prepare(dl_manager, download_config)
    # Runs inside TFDS's temporary data dir, which becomes the dataset dir on success.
    (self.data_path / "skipped_rows.json").write_text(
        json.dumps(self.skip_report.to_dict(), indent=1)
    )
    return result


def write_failed_skip_report(builder: CrispEdit) -> str:
  """Write the skip report of a build that failed (so has no dataset folder) beside where the
  dataset would have been: `<data_dir>/crispedit/<config>/skipped_rows.json`. Returns the path."""
  folder = os.path.dirname(os.fspath(builder.data_path))
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, "skipped_rows.json")
  with open(path, "w") as f:
    json.dump(builder.skip_report.to_dict(), f, indent=1)
  return path


def read_skip_report(data_path: os.PathLike | str) -> dict[str, Any] | None:
  """The `skipped_rows.json` written beside a built CrispEdit dataset, or None."""
  path = os.path.join(os.fspath(data_path), "skipped_rows.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


__all__ = [
    "CrispEdit",
    "CrispEditConfig",
    "CrispEditSchemaError",
    "SkipReport",
    "check_image",
    "find_shards",
    "normalize_category",
    "read_skip_report",
    "validate_shard",
    "write_failed_skip_report",
]
