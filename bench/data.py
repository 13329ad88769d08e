"""Input-pipeline throughput: examples per second for decode + crop + batch, and pre-tokenised reads.

    python -m bench.data [--data-dir DIR] [--batch-size 32] [--batches 40] [--workers 0 2]

Builds (once, into --data-dir) a `synthetic_edits` set at 128 px, a CrispEdit-shaped set
(1024 x 1024 JPEG pairs written to parquet here, built by the real `crispedit` builder) and a
pre-tokenised copy of the synthetic set (stand-in average-pool encoder: this measures reading
tokens, not the VQ encoder). Then, for every dataset and worker count, it times `--batches`
batches after the first one (whose time, which includes starting workers, is reported apart),
prints a table and appends it with the exact command to bench/RESULTS.md under "## Data pipeline".
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import shlex
import sys
import time

import numpy as np

from bench.results import RESULTS, append_to_section

HEADING = "## Data pipeline"


def _crispedit_like_parquet(raw_dir: str, rows: int, size: int) -> None:
  """Parquet shards in the CrispEdit-2M layout with smooth `size`-px JPEG pairs."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  from editmgt_jax.data.categories import EDIT_CATEGORIES  # pylint: disable=g-import-not-at-top

  os.makedirs(os.path.join(raw_dir, "data"), exist_ok=True)
  rng = np.random.default_rng(0)

  def jpeg() -> bytes:
    small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((size, size), Image.BICUBIC).save(buf, format="JPEG", quality=90)
    return buf.getvalue()

  per_type = max(1, rows // len(EDIT_CATEGORIES))
  for kind in tqdm(EDIT_CATEGORIES, desc="writing CrispEdit-shaped parquet"):
    table = pa.table({
        "input_img": [{"bytes": jpeg(), "path": f"{kind}_{i}_in.jpg"} for i in range(per_type)],
        "output_img": [{"bytes": jpeg(), "path": f"{kind}_{i}_out.jpg"} for i in range(per_type)],
        "instruction": [f"edit {i}" for i in range(per_type)],
        "type": [kind] * per_type,
    })
    pq.write_table(table, os.path.join(raw_dir, "data", f"{kind.replace(' ', '_')}_00000.parquet"),
                   row_group_size=16)


def prepare(data_dir: str, synthetic_examples: int, crispedit_rows: int) -> dict[str, dict]:
  """Builds the benchmark datasets if missing; returns {label: DatasetSpec kwargs}."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from editmgt_jax.data import crispedit  # pylint: disable=g-import-not-at-top
  from editmgt_jax.data import pretokenize  # pylint: disable=g-import-not-at-top
  from editmgt_jax.data.synthetic_edits import builder as synthetic_edits  # pylint: disable=g-import-not-at-top

  name = synthetic_edits.config_name(128, synthetic_examples, 0, 0)
  syn = synthetic_edits.SyntheticEdits(
      config=synthetic_edits.SyntheticEditsConfig(
          name=name, resolution=128, num_train=synthetic_examples, num_test=0, seed=0),
      data_dir=data_dir, file_format="array_record",
  )
  syn.download_and_prepare()

  raw = os.path.join(data_dir, "crispedit_like_raw")
  if not os.path.isdir(os.path.join(raw, "data")):
    _crispedit_like_parquet(raw, crispedit_rows, 1024)
  ce = crispedit.CrispEdit(config="default", data_dir=data_dir, file_format="array_record")
  ce.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=raw))

  tokens = os.path.join(data_dir, "synthetic_tokens_r128")
  if not os.path.exists(os.path.join(tokens, "metadata.json")):
    pretokenize.pretokenize(f"synthetic_edits/{name}", tokens, pretokenize.avgpool_encode_fn(16),
                            data_dir=data_dir, resolution=128, batch_size=64)
  return {
      "synthetic_edits 128px PNG": dict(name=f"synthetic_edits/{name}", data_dir=data_dir),
      "CrispEdit-shaped 1024px JPEG": dict(name="crispedit/default", data_dir=data_dir),
      "pre-tokenised synthetic (8x8 ids)": dict(tokens_dir=tokens),
  }


def measure(spec_kwargs: dict, resolution: int, batch_size: int, batches: int, workers: int) -> tuple[float, float]:
  """(examples/s over `batches` batches after the first, seconds to the first batch)."""
  from editmgt_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from editmgt_jax.data.synthetic_edits import SYNTHETIC_VOCAB  # pylint: disable=g-import-not-at-top
  from editmgt_jax.models.text.word_tokenizer import WordTokenizer  # pylint: disable=g-import-not-at-top

  cfg = pipeline.PipelineConfig(
      datasets=(pipeline.DatasetSpec(**spec_kwargs),), batch_size=batch_size, resolution=resolution,
      worker_count=workers, seed=0,
  )
  start = time.perf_counter()
  it = iter(pipeline.make_dataset(cfg, tokenize=WordTokenizer(SYNTHETIC_VOCAB), shard_index=0, shard_count=1))
  next(it)
  first = time.perf_counter() - start
  # Drain what workers buffered while the first batch was awaited: time the steady state only.
  for _ in range(workers * cfg.worker_buffer_size + 2):
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  rate = batches * batch_size / (time.perf_counter() - start)
  it.close()
  return rate, first


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__.split("\n\n")[0])
  p.add_argument("--data-dir", default="/tmp/editmgt_bench_data", help="where benchmark datasets are built")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--batches", type=int, default=40, help="timed batches per measurement")
  p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  p.add_argument("--synthetic-examples", type=int, default=4096)
  p.add_argument("--crispedit-rows", type=int, default=448)
  p.add_argument("--crispedit-resolution", type=int, default=256, help="crop side for the 1024 px set")
  p.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
  args = p.parse_args(argv)

  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.FLAGS.mark_as_parsed()
  specs = prepare(args.data_dir, args.synthetic_examples, args.crispedit_rows)
  rows = []
  for label, spec in specs.items():
    resolution = args.crispedit_resolution if "1024" in label else 128
    for workers in args.workers:
      rate, first = measure(spec, resolution, args.batch_size, args.batches, workers)
      rows.append((label, resolution, workers, rate, first))
      print(f"{label:<36} {resolution:>4}px  workers {workers}  {rate:8.1f} ex/s  first batch {first:.2f} s",
            flush=True)

  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  import grain  # pylint: disable=g-import-not-at-top

  command = "python -m bench.data " + shlex.join(argv if argv is not None else sys.argv[1:])
  lines = [
      f"`{command.strip()}` ({datetime.date.today()}; {os.cpu_count()} CPUs, shared, 1-min load "
      f"average {load:.1f} at the end; Python {platform.python_version()}, grain {grain.__version__}; "
      f"batch {args.batch_size}, {args.batches} timed batches after a warm-up; the first batch's time "
      "includes starting the workers)",
      "",
      "| data | crop | workers | examples/s | first batch (s) |",
      "|---|---|---|---|---|",
  ]
  lines += [f"| {label} | {res} px | {w} | {rate:.0f} | {first:.2f} |" for label, res, w, rate, first in rows]
  table = "\n".join(lines)
  print("\n" + table)
  if not args.no_record:
    append_to_section(HEADING, table)
    print(f"\nappended to {RESULTS}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
