"""Edit images with an instruction.

One edit (the shipped default model when --checkpoint is not given):
  python -m infer.edit --image examples/shapes.png --instruction "paint the orange circle at the top cyan" --out edited.png

The output has the input's own size: the model edits an aspect-preserving resize of the image (long
side at --size), and the edited pixels are upsampled and blended into the original through a
feathered region map, so every pixel outside the region is the source's own. --composite picks the
region: 'changed' (default; the tokens the edit changed, grown by one token), 'map' (the
consolidated edit-region map at --hold-threshold, 0.5 when hold is off). --no-composite writes the
raw model output instead, at the working size (e.g. 64x44 for a 600x400 photo and the default model).

Many edits, one compiled program per image shape, with a progress bar:
  python -m infer.edit --checkpoint CKPT --batch edits.jsonl --out-dir results/
  where each line of edits.jsonl is {"image": PATH, "instruction": TEXT, "out": NAME.png, "mask": PATH?}
Every line is checked (JSON, fields, images and masks readable, output names) before the model is
loaded. Lines that fail are skipped and listed, one line each, the rest are edited, and the exit
status is 2; when no line can be run nothing is loaded or written.

Inputs and outputs are checked before any work: a bad flag value, an unreadable image, an image over
100 megapixels, or an --out that cannot be written (no image extension, a directory) stops with one
line naming it and exit status 2. An existing --out file is replaced. Edits whose sampling takes
more than a few seconds show a progress bar over the steps.

Region hold: positions whose consolidated text-to-image attention score stays below
--hold-threshold keep the source's tokens (0 turns it off; a value above every upsampled score,
e.g. 10, copies the source). --consolidation-blocks picks the transformer blocks whose attention
is consolidated (global indices: dual-stream blocks first, then single-stream blocks).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from editmgt_jax.cli_flags import add_sampler_flags, check_sampler_flags, sampler_overrides
from editmgt_jax.edit_batch import read_batch


def check_flags(args) -> None:
    """Flag values the edit cannot use -> ``ValueError`` naming the flag (before anything loads)."""
    from editmgt_jax import imageio

    check_sampler_flags(args)
    if args.size is not None and args.size < 1:
        raise ValueError(f"--size {args.size}: must be a positive number of pixels")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.batch:
        if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
            raise ValueError(f"--out-dir {args.out_dir}: is a file, not a folder")
    else:
        if not args.instruction.strip():
            raise ValueError("--instruction: empty instruction")
        imageio.check_output_path(args.out, "--out")
        imageio.load_image(args.image, name=f"--image {args.image}")
        if args.mask:
            imageio.load_image(args.mask, name=f"--mask {args.mask}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infer.edit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="model checkpoint folder (default: the shipped model in checkpoints/)")
    src = p.add_argument_group("one edit")
    src.add_argument("--image", metavar="PATH", help="source image (any PIL-readable format)")
    src.add_argument("--instruction", metavar="TEXT", help="what to change, in words")
    src.add_argument("--out", metavar="PATH", default="edited.png",
                     help="where to write the edited image (an image extension; replaced if it exists)")
    src.add_argument("--mask", metavar="PATH", default=None,
                     help="inpainting mode: image whose non-zero pixels may change; the rest is kept")
    bat = p.add_argument_group("batch mode")
    bat.add_argument("--batch", metavar="FILE.jsonl", help="one JSON object per line: image, instruction, out, mask?")
    bat.add_argument("--out-dir", metavar="DIR", default="edits", help="folder for batch outputs")
    bat.add_argument("--batch-size", type=int, default=4, help="edits per compiled call (default 4)")
    s = p.add_argument_group("sampler (defaults come from the checkpoint)")
    add_sampler_flags(s)
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--size", type=int, help="working resolution in pixels (default: the checkpoint's)")
    s.add_argument("--resize", choices=["fit", "crop"], default="fit",
                   help="fit (default): long side to --size, aspect ratio kept, nothing cut off; "
                        "crop: short side to --size then the centre square (official)")
    s.add_argument("--negative-prompt", default=None, help="unconditional prompt for guidance")
    o = p.add_argument_group("output")
    o.add_argument("--composite", choices=["changed", "map"], default=None,
                   help="which pixels of the input take the edit: changed (tokens the edit changed, "
                        "grown by one token) or map (the edit-region map; needs consolidation); "
                        "default: the checkpoint's setting, else changed")
    o.add_argument("--no-composite", dest="composite", action="store_const", const="none",
                   help="write the raw model output at the working size instead of the input's size")
    o.add_argument("--save-heatmap", action="store_true",
                   help="also write <out>_heatmap.png: the consolidated edit-region map over the source")
    o.add_argument("--mesh", default=None, metavar="SPEC",
                   help="data-parallel batch editing over devices, e.g. 'data=8'")
    o.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="parameter and matmul dtype: fp32 (default, matches the official float32 "
                        "pipeline) or bf16 (accelerators; softmax, norms and logits stay float32)")
    return p


def _save_outputs(result, i: int, out_path: str, heatmap: bool) -> list[str]:
    from editmgt_jax import imageio

    from editmgt_jax import composite

    imageio.save_image(out_path, result.images[i])
    written = [out_path]
    if heatmap:
        if result.heatmaps is None:
            print("note: no heatmap: consolidation is off (give --consolidation-blocks)", file=sys.stderr)
        else:
            root, _ = os.path.splitext(out_path)
            hp = f"{root}_heatmap.png"
            # over the source at the input's own size
            score = composite.grid_to_input(result.heatmaps[i], result.placements[i])
            imageio.save_image(hp, imageio.heatmap_overlay(result.originals[i], score))
            written.append(hp)
    return written


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.batch and not (args.image and args.instruction is not None):
        print("error: give --image and --instruction, or --batch FILE.jsonl (see --help)", file=sys.stderr)
        return 2

    import warnings

    import editmgt_jax  # noqa: F401
    from editmgt_jax import checkpoints, imageio, parallel
    from editmgt_jax.editor import EditError, Editor

    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    try:
        check_flags(args)
        skipped: list[str] = []
        if args.batch:
            items, skipped = read_batch(args.batch, args.out_dir)
            for line in skipped:
                print(f"skipped {line}", file=sys.stderr)
            if not items:
                print(f"error: --batch {args.batch}: none of its {len(skipped)} edit(s) can be run "
                      f"(listed above); nothing written", file=sys.stderr)
                return 2
        mesh = parallel.parse_mesh_flag(args.mesh) if args.mesh else None
        t0 = time.time()
        import jax.numpy as jnp

        editor = Editor.load(args.checkpoint, mesh_shape=mesh,
                             dtype=jnp.bfloat16 if args.dtype == "bf16" else jnp.float32)
        print(f"loaded {editor.path} in {time.time() - t0:.1f}s", file=sys.stderr)
        over = sampler_overrides(args)
        common = dict(seed=args.seed, size=args.size, policy=args.resize, negative_prompt=args.negative_prompt,
                      composite=args.composite, progress=True, **over)
        try:   # settings this model cannot take fail before any compile
            editor.sampler_config(**over)
        except ValueError as e:
            raise ValueError(str(e).replace("consolidation_blocks", "--consolidation-blocks", 1)) from None
        if not args.batch:
            masks = [imageio.load_image(args.mask)] if args.mask else None
            t0 = time.time()
            res = editor.edit([args.image], [args.instruction], masks=masks, **common)
            for w in _save_outputs(res, 0, args.out, args.save_heatmap):
                print(w)
            print(f"edited in {time.time() - t0:.1f}s (compile included)", file=sys.stderr)
            return 0
        from tqdm import tqdm

        os.makedirs(args.out_dir, exist_ok=True)
        bar = tqdm(total=len(items), desc="editing", unit="edit")
        for start in range(0, len(items), args.batch_size):
            chunk = items[start:start + args.batch_size]
            with_mask = [c for c in chunk if c.get("mask")]
            groups = [chunk] if not with_mask or len(with_mask) == len(chunk) else [
                [c for c in chunk if not c.get("mask")], with_mask]
            for g in groups:
                masks = [imageio.load_image(c["mask"]) for c in g] if g[0].get("mask") else None
                res = editor.edit([c["image"] for c in g], [c["instruction"] for c in g], masks=masks, **common)
                for i, c in enumerate(g):
                    _save_outputs(res, i, os.path.join(args.out_dir, c["out"]), args.save_heatmap)
                bar.update(len(g))
        bar.close()
        print(f"wrote {len(items)} edit(s) to {args.out_dir}"
              + (f"; skipped {len(skipped)} (listed above)" if skipped else ""), file=sys.stderr)
        return 2 if skipped else 0
    except (EditError, imageio.ImageError, checkpoints.CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
