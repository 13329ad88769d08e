"""Peak host memory and time of one compiled medium edit at a given resolution.

    python -m bench.edit_memory [--px 1024,2048] [--steps 12] [--attention xla] [--no-record]
    python -m bench.edit_memory --model default --px 512 [--steps N]

Each resolution runs in its own process (so ``ru_maxrss`` belongs to that edit alone): the medium
transformer of ``bench/medium_transformer_config.json`` with random weights, random source ids of a
``px / 16`` grid (the VQ is left out: it is the same for both attention implementations and small),
256 text tokens, CFG 6 (model batch 2), reference strength 1.1, consolidation over every
single-stream block, lambda 0.3, the sampler as one compiled loop (``sample``). Peak memory does
not depend on the number of steps (one compiled loop), so large grids may run fewer steps.
``--attention`` picks the attention implementation (``naive``: full ``[B, H, S, S]`` logits).
``--model default`` measures the shipped default model instead (``Editor.edit`` of
``examples/astronaut.png`` resized to ``px``, text encoders and VQ included, its own sampler defaults
unless ``--steps`` is given; the time includes compilation).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(px: int, steps: int, attention: str) -> dict:
    import jax
    from flax import nnx

    from bench.sampler import EditSpec, compiled_edit, load_transformer_config, random_state
    from editmgt_jax.models.transformer import EditTransformer

    if px % 32:
        raise ValueError(f"--px {px}: must be a multiple of 32 (16x VQ, 2x down-sampling)")
    spec = EditSpec(id_grid=(px // 16, px // 16), steps=steps)
    cfg = load_transformer_config("medium")
    graphdef, state = random_state(lambda: EditTransformer(cfg, rngs=nnx.Rngs(0), attention=attention))
    compiled, args, compile_s = compiled_edit(graphdef, state, cfg, spec)
    temp = compiled.memory_analysis().temp_size_in_bytes
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    edit_s = time.perf_counter() - t
    tokens = 256 + 2 * (px // 32) ** 2
    return dict(px=px, attention=attention, steps=steps, tokens=tokens, compile_s=compile_s, edit_s=edit_s,
                temp_mib=temp / 2 ** 20,
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                load=os.getloadavg())


def run_default(px: int, steps: int | None) -> dict:
    import numpy as np
    from PIL import Image

    from editmgt_jax.editor import Editor

    editor = Editor.load()
    image = Image.open(os.path.join(REPO, "examples", "astronaut.png")).convert("RGB").resize((px, px))
    over = {} if steps is None else {"steps": steps}
    t = time.perf_counter()
    res = editor.edit([image], ["make the sky red"], size=px, **over)
    edit_s = time.perf_counter() - t
    h, w = np.asarray(res.tokens).shape[1:]
    return dict(px=px, attention="default model", steps=steps or editor.defaults.steps,
                tokens=f"{h}x{w} ids", compile_s=float("nan"), edit_s=edit_s, temp_mib=float("nan"),
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, load=os.getloadavg())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.edit_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--px", default="1024,2048")
    p.add_argument("--steps", type=int, default=None, help="decoding steps (default: 12; --model default: its own)")
    p.add_argument("--attention", default="xla")
    p.add_argument("--model", default="medium", choices=["medium", "default"],
                   help="the medium transformer with random weights, or the shipped default model")
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--_one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._one:
        if args.model == "default":
            print(json.dumps(run_default(args._one, args.steps)), flush=True)
        else:
            print(json.dumps(run_one(args._one, args.steps or 12, args.attention)), flush=True)
        return 0
    rows = []
    for px in (int(s) for s in args.px.split(",")):
        cmd = [sys.executable, "-m", "bench.edit_memory", "--_one", str(px), "--attention", args.attention,
               "--model", args.model] + (["--steps", str(args.steps)] if args.steps else [])
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if out.returncode:
            print(f"{px} px failed (exit {out.returncode}):\n{out.stderr[-2000:]}", file=sys.stderr)
            rows.append(dict(px=px, attention=args.attention, steps=args.steps, failed=out.returncode))
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    table = ("| px | attention tokens | attention | steps | compile (s) | edit (s) | XLA temporaries (MiB) "
             "| peak RSS (MiB) | 1-min load |\n|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        if "failed" in r:
            table += f"| {r['px']} | | {r['attention']} | {r['steps']} | failed (exit {r['failed']}) | | | | |\n"
        else:
            comp = "in the edit" if r["compile_s"] != r["compile_s"] else f"{r['compile_s']:.0f}"
            temp = "" if r["temp_mib"] != r["temp_mib"] else f"{r['temp_mib']:.0f}"
            table += (f"| {r['px']} | {r['tokens']} | {r['attention']} | {r['steps']} | {comp} "
                      f"| {r['edit_s']:.0f} | {temp} | {r['peak_rss_mib']:.0f} | {r['load'][0]:.1f} |\n")
    print(table)
    if not args.no_record:
        from bench.results import append_to_section
        command = "python -m bench.edit_memory " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        append_to_section("## Edit memory", f"\n`{command}` ({datetime.date.today().isoformat()})\n\n" + table,
                          intro=__doc__.split("\n\n", 2)[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
