"""Encode a dataset's images to VQ token ids once, so training does not re-encode them every epoch.

    python -m train.pretokenize --dataset synthetic_edits/default --data-dir ~/tfds --split train \\
        --out ~/tokens/synthetic_train --resolution 128 \\
        --vq-loader editmgt_jax.some_module:load_vq --vq-checkpoint PATH

Reads the dataset in record order through the same decode and centre-crop as the training pipeline
(`crop='center'`; random crops cannot be pre-computed), encodes source and target with a jitted
`VQModel.encode_ids` (pixels `[B, H, W, 3]` float in [0, 1] -> ids `[B, h, w] int32`) and writes
ArrayRecord shards plus `metadata.json` into `--out`. Read them back with
`DatasetSpec(tokens_dir=OUT)` in `editmgt_jax.data.pipeline`.

The encoder is injectable: `pretokenize()` takes any `encode_fn(pixels) -> ids`. `--encoder avgpool`
uses `avgpool_encode_fn`, a stand-in (average pooling by the downsample factor, then uniform colour
quantisation) for tests and pipeline benchmarks; its ids carry no learned meaning.

Atomic: the records are written into a temporary sibling of `--out` that replaces it when
complete, so a failed or killed run leaves `--out` as it was (an existing `--out` must be empty or
a pre-tokenised dataset). A flag value it cannot use, a dataset that is not built, or a VQ
checkpoint the loader cannot read is one `error:` line and exit status 2.
"""

from __future__ import annotations
import argparse
import os
import sys

from editmgt_jax.data.pretokenize import avgpool_encode_fn, check_out_dir, load_vq, pretokenize, vq_encode_fn


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m train.pretokenize",
      description="Encode a built dataset's source and target images to VQ ids, written to "
      "ArrayRecord for DatasetSpec(tokens_dir=...).",
  )
  p.add_argument("--dataset", required=True, help="TFDS name/config, e.g. synthetic_edits/default")
  p.add_argument("--data-dir", help="TFDS data dir the dataset was built into")
  p.add_argument("--split", default="train")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--resolution", type=int, default=256, help="centre-crop side that is encoded")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--num-shards", type=int, default=1, help="ArrayRecord files to write")
  p.add_argument("--limit", type=int, help="encode only the first N records")
  p.add_argument("--encoder", choices=("vq", "avgpool"), default="vq",
                 help="vq: the VQ model from --vq-loader/--vq-checkpoint; avgpool: the stand-in")
  p.add_argument("--vq-loader", help="'module:function' that loads a VQModel from --vq-checkpoint")
  p.add_argument("--vq-checkpoint", help="path handed to --vq-loader")
  p.add_argument("--downsample", type=int, default=16, help="avgpool: pixels per token side")
  args = p.parse_args(argv)
  try:
    return _run(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def _run(args) -> int:
  """The command after parsing; `ValueError` / `FileNotFoundError` name the flag or file."""
  for flag, value in (("--resolution", args.resolution), ("--batch-size", args.batch_size),
                      ("--num-shards", args.num_shards), ("--limit", args.limit), ("--downsample", args.downsample)):
    if value is not None and value < 1:
      raise ValueError(f"{flag} {value}: must be >= 1")
  check_out_dir(args.out)
  if args.encoder == "vq":
    if not (args.vq_loader and args.vq_checkpoint):
      raise ValueError("--encoder vq needs --vq-loader module:function and --vq-checkpoint PATH")
    if not os.path.exists(os.path.expanduser(args.vq_checkpoint)):
      raise ValueError(f"--vq-checkpoint {args.vq_checkpoint}: no such file or folder")
    try:
      model = load_vq(args.vq_loader, args.vq_checkpoint)
    except Exception as e:  # pylint: disable=broad-except  (the loader is the user's: any failure is one line)
      if str(e).startswith("--vq-loader"):
        raise
      first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
      raise ValueError(f"--vq-checkpoint {args.vq_checkpoint}: cannot be loaded by --vq-loader "
                       f"{args.vq_loader} ({first})") from None
    if not hasattr(model, "encode_ids"):
      raise ValueError(f"--vq-loader {args.vq_loader}: returned a {type(model).__name__}, not a VQ model "
                       "(no encode_ids)")
    encode_fn = vq_encode_fn(model)
    description = f"vq {args.vq_loader} {args.vq_checkpoint}"
  else:
    encode_fn = avgpool_encode_fn(args.downsample)
    description = f"avgpool factor {args.downsample} (stand-in)"
  meta = pretokenize(
      args.dataset, args.out, encode_fn, split=args.split, data_dir=args.data_dir,
      resolution=args.resolution, batch_size=args.batch_size, num_shards=args.num_shards,
      limit=args.limit, encoder_description=description,
  )
  print(f"wrote {meta['num_examples']} examples ({meta['grid'][0]}x{meta['grid'][1]} ids each) "
        f"to {args.out} in {meta['seconds']} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
