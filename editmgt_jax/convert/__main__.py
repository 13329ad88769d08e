"""Convert an official EditMGT release folder into an editmgt-jax model checkpoint, or back.

Example:
  python -m editmgt_jax.convert --official /data/EditMGT --out ckpt/editmgt-1024
  python -m editmgt_jax.convert --to-official ckpt/editmgt-1024 /data/EditMGT-exported

The release folder holds one subfolder per component, each with ``config.json`` and
``*.safetensors`` weights (sharded files with an index are read too):
  vqvae/        VQ tokenizer (diffusers VQModel)
  editmgt/ or transformer/   the EditMGT transformer
  text_encoder/ CLIP text tower with projection      (optional)
  llm_encoder/  Gemma-2 language model, used as an encoder (optional)
  tokenizer/    CLIP tokenizer files                 (optional, copied)
  scheduler/    scheduler_config.json: the mask token id (optional; default vocab_size - 1)
No PyTorch is needed; tensors are read one at a time.

--to-official CKPT OUT writes the checkpoint's transformer (editmgt/), VQ (vqvae/), text encoders
(text_encoder/, llm_encoder/), tokenizers and scheduler config in that layout, as safetensors with
the official key names and config.json files, for the official code's from_pretrained.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m editmgt_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", metavar="DIR", help="official release folder")
    p.add_argument("--out", metavar="CKPT", help="output checkpoint folder")
    p.add_argument("--to-official", nargs=2, metavar=("CKPT", "OUT"),
                   help="export the model checkpoint CKPT to the official release layout in OUT")
    p.add_argument("--components", default="", metavar="LIST",
                   help="comma-separated subset of vq,transformer,clip,gemma (default: all present)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="stored parameter dtype (default float32; conversion only: an export keeps the "
                        "checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (or OUT) folder")
    args = p.parse_args(argv)
    components = [c for c in args.components.split(",") if c] or None
    if args.to_official:
        if args.official or args.out:
            p.error("--to-official CKPT OUT replaces --official/--out; give one or the other")
        from editmgt_jax.convert import ConversionError
        from editmgt_jax.convert.export import export_official

        try:
            export_official(*args.to_official, components=components, overwrite=args.overwrite)
        except ConversionError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if not (args.official and args.out):
        p.error("give --official DIR --out CKPT (conversion) or --to-official CKPT OUT (export)")

    from editmgt_jax.convert import ConversionError, convert_release

    dtype = np.float32
    if args.dtype == "bfloat16":
        import ml_dtypes

        dtype = ml_dtypes.bfloat16
    try:
        convert_release(args.official, args.out,
                        components=components,
                        dtype=dtype, overwrite=args.overwrite)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
