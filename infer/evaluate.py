"""Evaluate an editor on a benchmark: batched edits, metrics, baselines and ablations in one report.

  python -m infer.evaluate --checkpoint CKPT --data synthetic_edits:DATA_DIR --out eval/
  python -m infer.evaluate --checkpoint CKPT --data folder:bench/magicbrush --out eval/ --ablations all

Data (--data SPEC):
  synthetic_edits:DATA_DIR[:SPLIT]   the held-out split ('test') of a dataset built with
                                     `python -m train.build_dataset synthetic_edits --data-dir DATA_DIR`
                                     (synthetic_edits/CONFIG:... picks one of several builds;
                                     crispedit:DATA_DIR[:SPLIT] and tfds:BUILT_DIR[:SPLIT] work too)
  folder:PATH                        PATH/manifest.jsonl (or PATH.jsonl) with one
                                     {"source", "target", "instruction", "mask"?, "category"?, "id"?}
                                     per line, or PATH/<id>/{source,target,mask?}.<ext> + instruction.txt
                                     (+ category.txt); masks are white where the edit belongs
  PATH                               detected from what is there
  (full rules: editmgt_jax/evaluation/datasets.py)

Outputs in --out DIR:
  report.json     every number: settings, seeds, per run and baseline the mean of each metric overall
                  and per category (with the number of edits it is defined for), timings, edits/s
  report.md       summary tables and image grids (PNG files in DIR/grids/)
  per_item.jsonl  one line per (run, item) with the item's metrics

Metrics (per edit, averaged): l1, psnr, ssim against the target; psnr_in: PSNR against the target
inside the ground-truth mask; leak_l1_src / leak_psnr_src: L1 / PSNR outside the mask against the
source; leak_l1_rec / leak_psnr_rec: the same against the VQ reconstruction of the source (what a
perfect region hold gives); for the consolidated edit-region map (when the run captures attention):
iou_topk (top-k pixels, k = the mask's area), iou_fixed (score >= --iou-threshold, default the run's
region-hold lambda, or 0.5 without hold) and auroc. L1 is in [0, 1] of the pixel range; a per-image
PSNR of identical pixels is capped at 100 dB, so JSON holds no infinities; undefined values are null.

Baselines, in the same tables: 'identity' (return the source) and 'vq_reconstruction' (encode and
decode the source; its leak_psnr_src is the ceiling an editor that keeps every source token reaches).

Runs: 'base' uses the checkpoint's sampler settings with the sampler flags below applied. --ablations
adds runs, each the base settings plus one change, all with the same batches and seeds (batch j uses
seed S + j). LIST is comma-separated; each item is GROUP or GROUP=V1/V2/...:
  hold       on/off        region hold with the base lambda (fallback 0.3) vs lambda 0, same blocks
  blocks     none/early/late/all (or explicit lists such as 2-4)  consolidation blocks; early = the
             first third of all transformer blocks, late = the last third
  lambda     0.1/0.2/0.3/0.5   region-hold threshold sweep
  steps      8/16/36       decoding steps sweep
  cfg        1/3/6/9       classifier-free guidance sweep
  keep       0/0.1/0.3     keep-source probability sweep (a cell keeps its source token when the
             model gives it at least this probability; 0 = off)
  inpaint    gt            inpainting with the ground-truth mask (an upper bound for region hold)
  composite  changed/pixels/map/none  which pixels take the edit (the changed tokens, the pixels of
             those whose decode moved, the edit-region map,
             or the raw model output; Editor.edit's composite)
  all        every group with its default values;  none  no ablations (default)
Runs that need consolidation blocks when the base has none use the 'late' preset. A run whose
settings equal an earlier run's reuses its results (noted as same_as in the JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from infer.flags import add_sampler_flags, sampler_overrides


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infer.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="model checkpoint folder, or hf:ORG/NAME[@REVISION] (a release on the hub, converted "
                        "once; default: the shipped model, editmgt_jax/assets/)")
    p.add_argument("--data", required=True, metavar="SPEC", help="evaluation set (see above)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for report.json, report.md and grids/")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N items only")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="edits per compiled call (default 8)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="base seed; batch j uses S + j (default 0)")
    p.add_argument("--ablations", default="none", metavar="LIST", help="ablation runs (see above; default none)")
    p.add_argument("--size", type=int, default=None, metavar="PX",
                   help="working resolution in pixels (default: the checkpoint's)")
    p.add_argument("--resize", choices=["crop", "fit"], default="crop",
                   help="how sources, targets and masks are brought to --size (default crop: short side "
                        "to --size, centre square)")
    s = p.add_argument_group("base sampler settings (defaults come from the checkpoint)")
    add_sampler_flags(s)
    s.add_argument("--negative-prompt", default=None, help="unconditional prompt for guidance")
    v = p.add_argument_group("ablation values and map metrics")
    v.add_argument("--iou-threshold", type=float, default=None, metavar="T",
                   help="fixed threshold for iou_fixed (default: each run's lambda, 0.5 without hold)")
    v.add_argument("--heatmap-upsample", choices=["bilinear", "nearest"], default="bilinear",
                   help="how token-grid maps are brought to pixels for IoU / AUROC (default bilinear)")
    o = p.add_argument_group("report")
    o.add_argument("--grid-per-category", type=int, default=3, metavar="K",
                   help="example rows per category in the image grids (default 3)")
    o.add_argument("--mesh", default=None, metavar="SPEC", help="data-parallel editing over devices, e.g. 'data=8'")
    return p


def check_out_dir(out: str) -> None:
    """``ValueError`` unless ``--out`` is a folder or can be made one (it is written at the end)."""
    from editmgt_jax.folders import unwritable

    why = unwritable(out, folder=True)
    if why:
        raise ValueError(f"--out {out}: {why}")


def main(argv=None) -> int:
    from editmgt_jax import host_memory

    host_memory.keep()   # before jax starts: later edits reuse the first one's pages
    args = build_parser().parse_args(argv)
    try:   # before any data or model is loaded
        sampler = sampler_overrides(args)
        check_out_dir(args.out)
        for flag, value, low in (("--limit", args.limit, 1), ("--batch-size", args.batch_size, 1),
                                 ("--size", args.size, 1), ("--seed", args.seed, 0)):
            if value is not None and value < low:
                raise ValueError(f"{flag} {value}: must be >= {low}")
        if args.seed >= 2**32:
            raise ValueError(f"--seed {args.seed}: must be below 2**32")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from editmgt_jax import checkpoints, compile_cache, imageio
    from editmgt_jax.editor import EditError
    from editmgt_jax.evaluation.ablations import UsageError
    from editmgt_jax.evaluation.datasets import EvalDataError
    from editmgt_jax.evaluation.report import fmt
    from editmgt_jax.evaluation.runner import EvalOptions, evaluate

    compile_cache.enable()
    try:
        t0 = time.time()
        fields = {f.name for f in dataclasses.fields(EvalOptions)}
        report = evaluate(EvalOptions(**{k: v for k, v in vars(args).items() if k in fields}, sampler=sampler))
    except (UsageError, EvalDataError, EditError, imageio.ImageError, checkpoints.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    base = report["runs"]["base"]["metrics"]
    ident = report["baselines"]["identity"]["metrics"]
    print(f"wrote {os.path.join(args.out, 'report.json')} and report.md in {time.time() - t0:.1f}s", file=sys.stderr)
    print(f"base: clean success {fmt(base['clean_success']['mean'])} (kept outside "
          f"{fmt(base['kept_outside']['mean'])}, inside-only {fmt(base['edit_success']['mean'])}), "
          f"PSNR {fmt(base['psnr']['mean'], 'psnr')} dB (identity {fmt(ident['psnr']['mean'], 'psnr')}), "
          f"median leak PSNR vs src {fmt(base['leak_psnr_src']['median'], 'psnr')} dB, "
          f"IoU top-k {fmt(base['iou_topk']['mean'])}, AUROC {fmt(base['auroc']['mean'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
