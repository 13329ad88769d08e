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
import sys
import time

from infer.flags import add_sampler_flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infer.edit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="model checkpoint folder, or hf:ORG/NAME[@REVISION] (a release on the hub, converted "
                        "once; default: the shipped model, editmgt_jax/assets/)")
    src = p.add_argument_group("one edit")
    src.add_argument("--image", metavar="PATH", help="source image (any PIL-readable format)")
    src.add_argument("--instruction", metavar="TEXT", help="what to change, in words")
    src.add_argument("--out", metavar="PATH", default=None,
                     help="where to write the edited image (default ./edited.png; an image extension; "
                          "replaced if it exists, never when it is --image or --mask)")
    src.add_argument("--mask", metavar="PATH", default=None,
                     help="inpainting mode: image whose non-zero pixels may change; the rest is kept")
    bat = p.add_argument_group("batch mode")
    bat.add_argument("--batch", metavar="FILE.jsonl", help="one JSON object per line: image, instruction, out, mask?")
    bat.add_argument("--out-dir", metavar="DIR", default=None,
                     help="folder for batch outputs (default ./edits/; a line without \"out\" writes "
                          "<line number>.png, e.g. 00003.png)")
    bat.add_argument("--batch-size", type=int, default=4, help="edits per compiled call (default 4)")
    s = p.add_argument_group("sampler (defaults come from the checkpoint)")
    add_sampler_flags(s)
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--size", type=int, help="working resolution in pixels (default: the checkpoint's)")
    s.add_argument("--resize", choices=["fit", "crop"], default="fit",
                   help="fit (default): long side to --size, aspect ratio kept, nothing cut off; "
                        "crop: short side to --size then the centre square (official)")
    s.add_argument("--negative-prompt", default=None, help="unconditional prompt for guidance")
    s.add_argument("--query-words", default=None, metavar="WORDS",
                   help="words of the instruction whose text rows alone query the edit-region map "
                        "(official local_query_text), e.g. 'orange circle'; needs consolidation blocks")
    o = p.add_argument_group("output")
    o.add_argument("--no-composite", dest="composite", action="store_const", const="none",
                   help="write the raw model output at the working size instead of the input's size "
                        "(--composite none)")
    o.add_argument("--save-heatmap", action="store_true",
                   help="also write <out>_heatmap.png: the consolidated edit-region map over the source")
    o.add_argument("--mesh", default=None, metavar="SPEC",
                   help="data-parallel batch editing over devices, e.g. 'data=8'")
    o.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="parameter and matmul dtype: fp32 (default, matches the official float32 "
                        "pipeline) or bf16 (accelerators; softmax, norms and logits stay float32)")
    o.add_argument("--lora-scale", type=float, default=1.0, metavar="S",
                   help="a LoRA fine-tune's adapters are merged at this scale (default 1; 0 = the base "
                        "model); other checkpoints ignore it")
    return p


def main(argv=None) -> int:
    from editmgt_jax import host_memory

    host_memory.keep()   # before jax starts: later edits reuse the first one's pages
    args = build_parser().parse_args(argv)
    if args.batch:
        mixed = [f for f, v in (("--image", args.image), ("--instruction", args.instruction), ("--out", args.out),
                                ("--mask", args.mask)) if v is not None]
        if mixed:
            print(f"error: --batch edits the images its lines name; {', '.join(mixed)} would be ignored: "
                  f"give either --batch or one edit's flags", file=sys.stderr)
            return 2
        args.out_dir = args.out_dir or "edits"
    else:
        if not (args.image and args.instruction is not None):
            print("error: give --image and --instruction, or --batch FILE.jsonl (see --help)", file=sys.stderr)
            return 2
        if args.out_dir is not None:
            print("error: --out-dir is for --batch; one edit is written to --out", file=sys.stderr)
            return 2
        args.out = args.out or "edited.png"

    import warnings

    from editmgt_jax import checkpoints, imageio
    from infer import edit_cli
    from infer.edit_batch import read_batch
    from editmgt_jax.editor import EditError

    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    try:
        settings = edit_cli.check_flags(args)
        items, skipped = read_batch(args.batch, args.out_dir, args.save_heatmap) if args.batch else ([], [])
        for line in skipped:
            print(f"skipped {line}", file=sys.stderr)
        if args.batch and not items:
            print(f"error: --batch {args.batch}: none of its {len(skipped)} edit(s) can be run "
                  f"(listed above); nothing written", file=sys.stderr)
            return 2
        t0 = time.time()
        editor = edit_cli.load_editor(args)
        print(f"loaded {editor.path} in {time.time() - t0:.1f}s", file=sys.stderr)
        if not args.batch:
            t0 = time.time()
            for w in edit_cli.edit_one(editor, args, settings):
                print(w)
            print(f"edited in {time.time() - t0:.1f}s (compile included)", file=sys.stderr)
            return 0
        edit_cli.edit_batch(editor, items, args, settings)
        print(f"wrote {len(items)} edit(s) to {args.out_dir}"
              + (f"; skipped {len(skipped)} (listed above)" if skipped else ""), file=sys.stderr)
        return 2 if skipped else 0
    except (EditError, imageio.ImageError, checkpoints.CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
