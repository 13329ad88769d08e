"""Build a dataset as TFDS ArrayRecord files.

    python -m train.build_dataset synthetic_edits --data-dir OUT [--num-examples N] [--seed S]
                                                  [--resolution R] [--num-test M] [--workers W]
    python -m train.build_dataset crispedit --data-dir OUT --manual-dir RAW
                                            [--num-examples N] [--holdout-fraction F] [--seed S]

Prints TFDS's progress bars while it works, then a summary of what it wrote (config, splits,
examples, bytes, files) and, for CrispEdit, what it skipped and why (also kept in
`skipped_rows.json` beside the dataset). Exit status: 0 on success, 2 for a flag value no build can
use (one `error:` line, before anything is written), a CrispEdit shard with the wrong schema or
missing input, 1 on any other failure. `--overwrite` builds the new dataset beside the old one and
swaps it in when complete: a failed or killed rebuild leaves the old one as it was.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

DATASETS = ("synthetic_edits", "crispedit")
MIN_RESOLUTION = 16          # the smallest side the synthetic shapes are drawn at


class UsageError(ValueError):
  """A flag value the build cannot use (printed as one `error:` line, exit status 2)."""


def check_flags(args) -> None:
  """`UsageError` naming the first flag no build can use, before anything is read or written."""
  for flag, value, low in (("--num-examples", args.num_examples, 1), ("--num-test", args.num_test, 1),
                           ("--resolution", args.resolution, MIN_RESOLUTION), ("--workers", args.workers, 0)):
    if value is not None and value < low:
      why = " (the smallest images the synthetic shapes are drawn at)" if flag == "--resolution" else ""
      raise UsageError(f"{flag} {value}: must be >= {low}{why}")
  if args.holdout_fraction is not None and not 0 <= args.holdout_fraction < 1:
    raise UsageError(f"--holdout-fraction {args.holdout_fraction}: must be in [0, 1)")
  from editmgt_jax.folders import unwritable  # pylint: disable=g-import-not-at-top

  why = unwritable(args.data_dir, folder=True)
  if why:
    raise UsageError(f"--data-dir {args.data_dir}: {why}")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m train.build_dataset",
      description=__doc__.split("\n\n")[0] + " Names: synthetic_edits (generated here, "
      "deterministic from --seed) and crispedit (CrispEdit-2M from its parquet shards in "
      "--manual-dir; nothing is downloaded). Append /CONFIG to use a named config "
      "(synthetic_edits/small, crispedit/holdout); the size flags below make a custom one.",
      epilog="Example: python -m train.build_dataset synthetic_edits --data-dir ~/tfds "
      "--num-examples 20000 --resolution 128",
  )
  p.add_argument("name", help="synthetic_edits or crispedit, optionally /CONFIG")
  p.add_argument("--data-dir", required=True, help="TFDS data dir to write into")
  p.add_argument("--manual-dir", help="crispedit: folder with data/*.parquet (or *.parquet)")
  p.add_argument("--num-examples", type=int,
                 help="synthetic_edits: train examples; crispedit: read at most this many rows")
  p.add_argument("--num-test", type=int,
                 help="synthetic_edits: held-out test examples (default: num-examples / 10)")
  p.add_argument("--seed", type=int,
                 help="synthetic_edits: generation seed; crispedit: seed of the held-out selection")
  p.add_argument("--resolution", type=int, help="synthetic_edits: image side in pixels")
  p.add_argument("--holdout-fraction", type=float,
                 help="crispedit: fraction of parquet row groups held out as 'validation'")
  p.add_argument("--workers", type=int, default=0,
                 help="synthetic_edits: render in this many processes (same output); "
                 "crispedit: threads decode-checking images (default: CPU count)")
  p.add_argument("--overwrite", action="store_true", help="rebuild even if the dataset exists")
  return p


def _synthetic_builder(args, config_name: str | None):
  from editmgt_jax.data.synthetic_edits import builder as se  # pylint: disable=g-import-not-at-top

  if args.manual_dir or args.holdout_fraction is not None:
    raise UsageError("--manual-dir and --holdout-fraction apply to crispedit only.")
  custom = any(v is not None for v in (args.num_examples, args.num_test, args.seed, args.resolution))
  named = {c.name: c for c in se.SyntheticEdits.BUILDER_CONFIGS}
  base = named.get(config_name or "default")
  if base is None:
    raise UsageError(f"synthetic_edits has no config {config_name!r} (configs: {', '.join(named)}).")
  config = base
  if custom:
    num_train = args.num_examples if args.num_examples is not None else base.num_train
    num_test = args.num_test if args.num_test is not None else (
        max(1, num_train // 10) if args.num_examples is not None else base.num_test)
    resolution = args.resolution if args.resolution is not None else base.resolution
    seed = args.seed if args.seed is not None else base.seed
    config = se.SyntheticEditsConfig(
        name=se.config_name(resolution, num_train, num_test, seed),
        description=f"{num_train} train / {num_test} test at {resolution} px, seed {seed}.",
        resolution=resolution, num_train=num_train, num_test=num_test, seed=seed,
    )
  return se.SyntheticEdits(
      config=config, data_dir=args.data_dir, file_format="array_record", num_workers=args.workers
  )


def _crispedit_builder(args, config_name: str | None):
  from editmgt_jax.data import crispedit as ce  # pylint: disable=g-import-not-at-top

  if args.resolution is not None or args.num_test is not None:
    raise UsageError("--resolution and --num-test apply to synthetic_edits only; CrispEdit keeps "
                     "its images at their original size (the pipeline resizes).")
  if not args.manual_dir:
    raise UsageError("crispedit needs --manual-dir RAW (the folder holding data/*.parquet).")
  named = {c.name: c for c in ce.CrispEdit.BUILDER_CONFIGS}
  base = named.get(config_name or "default")
  if base is None:
    raise UsageError(f"crispedit has no config {config_name!r} (configs: {', '.join(named)}).")
  config = base
  if any(v is not None for v in (args.num_examples, args.seed, args.holdout_fraction)):
    fraction = args.holdout_fraction if args.holdout_fraction is not None else base.holdout_fraction
    seed = args.seed if args.seed is not None else base.holdout_seed
    parts = [f"holdout{fraction:g}_s{seed}"]
    if args.num_examples is not None:
      parts.append(f"max{args.num_examples}")
    config = ce.CrispEditConfig(
        name="_".join(parts).replace(".", "p"),
        description=f"held-out fraction {fraction:g} (seed {seed})"
        + (f", at most {args.num_examples} rows." if args.num_examples is not None else ", all rows."),
        holdout_fraction=fraction, holdout_seed=seed, max_examples=args.num_examples,
    )
  return ce.CrispEdit(
      config=config, data_dir=args.data_dir, file_format="array_record",
      num_threads=args.workers or None,
  )


def _human(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024
  return str(n)


def summarize(builder, seconds: float | None, data_dir: str) -> str:
  """What a built dataset holds: config, splits with examples, bytes and files."""
  info = builder.info
  lines = [f"{builder.name}/{builder.builder_config.name} {builder.version} at {builder.data_path}"]
  if builder.builder_config.description:
    lines.append(f"  {builder.builder_config.description}")
  total_bytes = 0
  for name, split in sorted(info.splits.items()):
    files = split.num_shards
    total_bytes += split.num_bytes
    lines.append(f"  {name:<11} {split.num_examples:>10,} examples  {_human(split.num_bytes):>11}  "
                 f"{files} file{'s' if files != 1 else ''}")
  lines.append(f"  total       {_human(total_bytes)}" + (f" in {seconds:.1f} s" if seconds else ""))
  lines.append(f"  read it with DatasetSpec(name='{builder.name}/{builder.builder_config.name}', "
               f"data_dir='{os.path.abspath(data_dir)}')")
  return "\n".join(lines)


def _download_config(args):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds.download.DownloadConfig(
      manual_dir=os.path.abspath(args.manual_dir) if args.manual_dir else None,
      download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
  )


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  from editmgt_jax.data import crispedit as ce  # pylint: disable=g-import-not-at-top

  dataset, _, config_name = args.name.partition("/")
  if dataset not in DATASETS:
    print(f"error: unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}.", file=sys.stderr)
    return 2
  try:
    check_flags(args)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if dataset == "crispedit" and args.manual_dir:
    # Checked here so a missing or empty folder is one line, not a TFDS traceback.
    problem = None
    if not os.path.isdir(args.manual_dir):
      problem = "is not a directory"
    else:
      try:
        ce.find_shards(args.manual_dir)
      except FileNotFoundError:
        problem = "holds no parquet shards in data/ or at its top level"
    if problem:
      print(f"input missing: --manual-dir {args.manual_dir} {problem} (it should hold CrispEdit-2M's "
            f"data/*.parquet files, downloaded beforehand; nothing is downloaded here)", file=sys.stderr)
      return 2
  make = _synthetic_builder if dataset == "synthetic_edits" else _crispedit_builder
  try:
    builder = make(args, config_name or None)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  already = builder.is_prepared() and not args.overwrite
  start = time.time()
  working, tmp = builder, None
  try:
    if args.overwrite and builder.is_prepared():
      # --overwrite: built again in a temporary data dir inside --data-dir (.build-tmp-PID), whose
      # finished version folder then replaces the old one; a failed or killed rebuild leaves the
      # old dataset as it was.
      from editmgt_jax.folders import remove_stale, replace_folder  # pylint: disable=g-import-not-at-top

      remove_stale(os.path.expanduser(args.data_dir), ".build-tmp-")
      tmp = os.path.join(os.path.expanduser(args.data_dir), f".build-tmp-{os.getpid()}")
      shutil.rmtree(tmp, ignore_errors=True)
      working = make(argparse.Namespace(**{**vars(args), "data_dir": tmp}), config_name or None)
    working.download_and_prepare(download_config=_download_config(args))
    if tmp is not None:
      replace_folder(os.fspath(working.data_path), os.fspath(builder.data_path))
      builder = make(args, config_name or None)
  except ce.CrispEditSchemaError as e:
    print(f"schema error: {e}", file=sys.stderr)
    return 2
  except FileNotFoundError as e:
    print(f"input missing: {e}", file=sys.stderr)
    return 2
  except Exception:  # pylint: disable=broad-except
    # Every row skipped: TFDS refuses an empty split. Say why, from the report written first.
    report = getattr(working, "skip_report", None)
    if dataset != "crispedit" or report is None or not report.rows_read or report.total < report.rows_read:
      raise
    builder.skip_report = report
    path = ce.write_failed_skip_report(builder)
    print(f"no examples: all {report.rows_read:,} rows read were skipped; nothing written. "
          f"Reasons (details in {path}):", file=sys.stderr)
    for reason, count in report.counts.most_common():
      print(f"  {count:,} x {reason}", file=sys.stderr)
    return 2
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
  print()
  if already:
    print("(already built; nothing written. Pass --overwrite to rebuild.)")
  print(summarize(builder, None if already else time.time() - start, args.data_dir))
  if dataset == "crispedit":
    report = ce.read_skip_report(builder.data_path)
    if report is not None:
      print(f"  rows read {report['rows_read']:,}; skipped {report['skipped']:,}; "
            f"re-encoded as RGB {report['converted_to_rgb']:,}")
      for reason, count in sorted(report["skipped_by_reason"].items(), key=lambda kv: -kv[1]):
        files = [f for f, c in report["skipped_by_file"].items() if reason in c]
        print(f"    {count:,} x {reason}: {', '.join(files[:5])}" + (" ..." if len(files) > 5 else ""))
      if report["skipped"]:
        print(f"  details: {os.path.join(builder.data_path, 'skipped_rows.json')}")
  else:
    print("  skipped: nothing (every example is generated)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
