"""What ``python -m infer.edit`` does, as library functions: its flag checks, the sampler settings
from its flags, one edit, a batch of edits (one compiled program per image shape) and the files
written for each edit (the image, and with ``--save-heatmap`` the edit-region map over the source).

Every function raises ``ValueError`` (or ``EditError``, ``ImageError``, ``CheckpointError``) with a
message naming the flag or file; the command prints it and exits with status 2.
"""

from __future__ import annotations

import math
import os
import sys

from infer.flags import sampler_overrides


def output_files(out: str, heatmap: bool) -> list[str]:
    """The files an edit writes for ``out``: the image, and with ``heatmap`` ``<out>_heatmap.png``."""
    return [out] + ([f"{os.path.splitext(out)[0]}_heatmap.png"] if heatmap else [])


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (symbolic links and ``..`` resolved; the files need not exist)."""
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def check_flags(args) -> dict:
    """Flag values the edit cannot use -> ``ValueError`` naming the flag (before anything loads);
    the ``Editor.edit`` keywords of the flags (sampler settings, seed, size, resize policy, negative
    prompt; progress bars on)."""
    from editmgt_jax import imageio
    from editmgt_jax.folders import unwritable

    settings = dict(seed=args.seed, size=args.size, policy=args.resize, negative_prompt=args.negative_prompt,
                    progress=True, **sampler_overrides(args))
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed {args.seed}: must be in [0, {2**32 - 1}]")
    if args.size is not None and args.size < 1:
        raise ValueError(f"--size {args.size}: must be a positive number of pixels")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
    if not math.isfinite(getattr(args, "lora_scale", 1.0)):
        raise ValueError(f"--lora-scale {args.lora_scale}: must be a finite number")
    if getattr(args, "query_words", None) is not None:
        if args.batch:
            raise ValueError("--query-words: applies to one edit (--image / --instruction), not to --batch")
        if not args.query_words.strip():
            raise ValueError("--query-words: empty; give words of the instruction")
    if args.batch:
        why = unwritable(args.out_dir, folder=True)
        if why:
            raise ValueError(f"--out-dir {args.out_dir}: {why}")
    else:
        if not args.instruction.strip():
            raise ValueError("--instruction: empty instruction")
        imageio.check_output_path(args.out, "--out")
        for written in output_files(args.out, args.save_heatmap):
            for flag, source in (("--image", args.image), ("--mask", args.mask)):
                if source and same_file(written, source):
                    raise ValueError(f"--out {args.out}: would write {written}, which is the {flag} file; "
                                     "choose another --out (source images are never replaced)")
        imageio.load_image(args.image, name=f"--image {args.image}")
        if args.mask:
            imageio.load_image(args.mask, name=f"--mask {args.mask}")
    return settings


def load_editor(args):
    """The ``Editor`` of ``--checkpoint`` (the shipped model when not given), in ``--dtype``, over
    ``--mesh`` when given."""
    import jax.numpy as jnp

    from editmgt_jax import parallel
    from editmgt_jax.editor import Editor

    mesh = parallel.parse_mesh_flag(args.mesh) if args.mesh else None
    return Editor.load(args.checkpoint, mesh_shape=mesh, dtype=jnp.bfloat16 if args.dtype == "bf16" else jnp.float32,
                       lora_scale=getattr(args, "lora_scale", 1.0))


def save_outputs(result, i: int, out_path: str, heatmap: bool) -> list[str]:
    """Write edit ``i`` of ``result`` to ``out_path`` (and, with ``heatmap``, ``<out>_heatmap.png``:
    the consolidated edit-region map over the source at the input's own size); the paths written."""
    from editmgt_jax import composite, imageio

    imageio.save_image(out_path, result.images[i])
    written = [out_path]
    if heatmap:
        if result.heatmaps is None:
            print("note: no heatmap: consolidation is off (give --consolidation-blocks)", file=sys.stderr)
        else:
            root, _ = os.path.splitext(out_path)
            hp = f"{root}_heatmap.png"
            score = composite.grid_to_input(result.heatmaps[i], result.placements[i])
            imageio.save_image(hp, imageio.heatmap_overlay(result.originals[i], score))
            written.append(hp)
    return written


def edit_one(editor, args, settings: dict) -> list[str]:
    """The single edit of ``--image`` / ``--instruction`` (``--mask``), written to ``--out``; the
    paths written."""
    from editmgt_jax import imageio

    masks = [imageio.load_image(args.mask)] if args.mask else None
    query = getattr(args, "query_words", None)
    res = editor.edit([args.image], [args.instruction], masks=masks,
                      **({"query_words": query} if query else {}), **settings)
    return save_outputs(res, 0, args.out, args.save_heatmap)


def edit_batch(editor, items: list[dict], args, settings: dict) -> None:
    """The edits of a batch file (``edit_batch.read_batch``'s items), ``--batch-size`` per call, into
    ``--out-dir``, with a progress bar. A chunk with masks on some items only runs as two calls."""
    from tqdm import tqdm

    from editmgt_jax import imageio

    os.makedirs(args.out_dir, exist_ok=True)
    bar = tqdm(total=len(items), desc="editing", unit="edit")
    for start in range(0, len(items), args.batch_size):
        chunk = items[start:start + args.batch_size]
        with_mask = [c for c in chunk if c.get("mask")]
        groups = [chunk] if not with_mask or len(with_mask) == len(chunk) else [
            [c for c in chunk if not c.get("mask")], with_mask]
        for g in groups:
            masks = [imageio.load_image(c["mask"]) for c in g] if g[0].get("mask") else None
            res = editor.edit([c["image"] for c in g], [c["instruction"] for c in g], masks=masks, **settings)
            for i, c in enumerate(g):
                save_outputs(res, i, os.path.join(args.out_dir, c["out"]), args.save_heatmap)
            bar.update(len(g))
    bar.close()
