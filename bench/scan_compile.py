"""Compile time of the released-size program with the transformer blocks unrolled against scanned.

    python -m bench.scan_compile [--programs forward,edit] [--rounds 2] [--steps 36] [--dtype float32]
                                 [--no-record]

Lowers and compiles, without running, the released transformer (RELEASED_CONFIG, abstract weights:
nothing of its 1B parameters is allocated) at 1024 px (64x64 ids, 32x32 transformer tokens, 256 text
tokens): ``forward``, one forward of the CFG batch (2) with the reference stream; ``edit``, the
whole ``--steps`` edit program of bench.sampler (the sampling loop with guidance, the region hold and
the heat map's captured block). Each program is built with ``EditTransformer(scan_blocks=False)``
(one copy of each block in the program) and ``scan_blocks=True`` (each run of blocks of one kind
that captures nothing as one ``lax.scan``), alternating, ``--rounds`` times. Reported per build:
seconds to trace and lower, seconds to compile (wall, and the process's CPU seconds: on a shared
machine the wall time includes waiting for a core), the compiled program's FLOPs (cost analysis) and its
temporary memory (memory analysis): the same numbers say the two programs do the same work.
Appended to bench/RESULTS.md under "## Compilation cache" unless ``--no-record``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time

from bench.results import RESULTS, append_to_section

HEADING = "## Compilation cache"
GIB = 1024 ** 3


def _released(dtype_name: str, scan: bool):
    import jax.numpy as jnp
    from flax import nnx

    from editmgt_jax.models.transformer import RELEASED_CONFIG, EditTransformer, TransformerConfig

    cfg = TransformerConfig.from_official(RELEASED_CONFIG)
    dt = jnp.dtype(dtype_name)
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: EditTransformer(cfg, rngs=nnx.Rngs(0), dtype=dt, param_dtype=dt, scan_blocks=scan)))
    return cfg, graphdef, state


def program(name: str, scan: bool, steps: int, dtype_name: str):
    """``(fn, args)`` of program ``name`` (abstract transformer state in ``args[0]``)."""
    import jax.numpy as jnp
    from flax import nnx

    from bench.sampler import EditSpec, make_inputs, sampler_config
    from editmgt_jax.sampling.region_hold import sample

    cfg, graphdef, state = _released(dtype_name, scan)
    spec = EditSpec(id_grid=(64, 64), text_len=256, steps=steps, batch=1)
    x = make_inputs(cfg, spec)
    if name == "forward":
        ids = jnp.concatenate([x["ref_ids"]] * 2)
        text = jnp.concatenate([x["text"], x["neg_text"]])
        pooled = jnp.concatenate([x["pooled"], x["neg_pooled"]])
        micro = jnp.concatenate([x["micro"]] * 2)

        def fwd(st, ids, ref, text, pooled, micro, t):
            return nnx.merge(graphdef, st)(ids, ref, text, pooled, micro, t, reference_strength=jnp.float32(1.1))[0]

        return fwd, (state, ids, ids, text, pooled, micro, jnp.asarray([5, 5], jnp.int32))
    tcfg, knobs = sampler_config(cfg, spec).split()

    def edit(st, ref_ids, text, pooled, neg_text, neg_pooled, micro, key):
        out = sample(nnx.merge(graphdef, st), tcfg, knobs, ref_ids, text, pooled, neg_text, neg_pooled,
                     key=key, micro_conds=micro)
        return out["tokens"], out["heatmap"]

    return edit, (state, x["ref_ids"], x["text"], x["pooled"], x["neg_text"], x["neg_pooled"], x["micro"], x["key"])


def measure(name: str, scan: bool, steps: int, dtype_name: str) -> dict:
    import jax

    from bench.sampler import _flops

    fn, args = program(name, scan, steps, dtype_name)
    c0, t0 = time.process_time(), time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    c1, t1 = time.process_time(), time.perf_counter()
    compiled = lowered.compile()
    c2, t2 = time.process_time(), time.perf_counter()
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    return dict(program=name, scan=scan, lower_s=t1 - t0, compile_s=t2 - t1, lower_cpu_s=c1 - c0,
                compile_cpu_s=c2 - c1, flops=_flops(compiled),
                temp_gib=None if temp is None else temp / GIB)


def results_text(rows: list[dict], command: str, steps: int, dtype_name: str) -> str:
    lines = [f"### {datetime.date.today().isoformat()}: `{command}`", "",
             f"Host {platform.node() or '?'}, {os.cpu_count()} CPUs, load average at the end "
             f"{os.getloadavg()[0]:.1f}; released transformer, 1024 px, {dtype_name}, edit of {steps} steps.", "",
             "| program | blocks | round | trace + lower s | compile s | trace + lower CPU s | compile CPU s "
             "| TFLOPs (cost analysis) | temporaries GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fl = "-" if not r["flops"] else f"{r['flops'] / 1e12:.2f}"
        tg = "-" if r["temp_gib"] is None else f"{r['temp_gib']:.2f}"
        lines.append(f"| {r['program']} | {'scanned' if r['scan'] else 'unrolled'} | {r['round']} | "
                     f"{r['lower_s']:.1f} | {r['compile_s']:.1f} | {r['lower_cpu_s']:.1f} | {r['compile_cpu_s']:.1f} | "
                     f"{fl} | {tg} |")
    lines.append("")
    for name in dict.fromkeys(r["program"] for r in rows):
        sel = {s: [r for r in rows if r["program"] == name and r["scan"] == s] for s in (False, True)}
        med = {s: statistics.median(r["lower_s"] + r["compile_s"] for r in sel[s]) for s in sel}
        cpu = {s: statistics.median(r["lower_cpu_s"] + r["compile_cpu_s"] for r in sel[s]) for s in sel}
        lines.append(f"{name}: median trace + lower + compile {med[False]:.1f} s unrolled, {med[True]:.1f} s "
                     f"scanned ({med[False] / med[True]:.2f}x); CPU {cpu[False]:.1f} s against {cpu[True]:.1f} s "
                     f"({cpu[False] / cpu[True]:.2f}x).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scan_compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--programs", default="forward,edit")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=36)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    programs = [s.strip() for s in args.programs.split(",") if s.strip()]
    bad = [s for s in programs if s not in ("forward", "edit")]
    if bad or not programs:
        print(f"error: --programs {args.programs}: use forward and/or edit", file=sys.stderr)
        return 2
    if args.rounds < 1 or args.steps < 1:
        print("error: --rounds and --steps must be >= 1", file=sys.stderr)
        return 2
    import jax

    rows = []
    for rnd in range(1, args.rounds + 1):
        for name in programs:
            for scan in (False, True) if rnd % 2 else (True, False):
                jax.clear_caches()
                r = measure(name, scan, args.steps, args.dtype)
                r["round"] = rnd
                rows.append(r)
                print(f"[scan_compile] {name} {'scanned' if scan else 'unrolled'} round {rnd}: lower "
                      f"{r['lower_s']:.1f} s ({r['lower_cpu_s']:.1f} CPU s), compile {r['compile_s']:.1f} s "
                      f"({r['compile_cpu_s']:.1f} CPU s)", file=sys.stderr, flush=True)
    command = "python -m bench.scan_compile " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = results_text(rows, command.strip(), args.steps, args.dtype)
    print(text)
    if not args.no_record:
        append_to_section(HEADING, text, path=RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
