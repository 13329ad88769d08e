"""Attention implementations on this machine: the core alone and the medium transformer forward.

    python -m bench.attention [--impls naive,xla] [--repeats 3] [--forward] [--no-record]

In one process, interleaved rounds (the order rotates every round), median of ``--repeats``:

* the attention core at the medium benchmark's shape (CFG batch 2, 8 heads x 64, 256 text + 1024
  image + 1024 reference tokens = 2304), reference strength 1.1, capture of the text rows on, for
  each implementation in ``--impls``; also XLA's temporary-buffer size of each compiled core;
* with ``--forward``: one medium transformer forward on the CFG batch (1024 px: 64x64 ids, 32x32
  grid), capture over the single-stream blocks, random weights, per implementation;
* a 2048^3 float32 ``jnp.dot`` (the machine's matmul peak, same rounds).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--impls", default="naive,xla")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--forward", action="store_true", help="also the medium transformer forward")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    load0 = os.getloadavg()

    import jax
    import jax.numpy as jnp
    from flax import nnx

    import editmgt_jax  # noqa: F401
    from editmgt_jax.models.attention import Segments, attention

    impls = args.impls.split(",")
    seg = Segments(256, 1024, 1024)
    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (2, 8, seg.total, 64), jnp.float32) for kk in ks)
    ls = jnp.log(jnp.float32(1.1))
    progs, temps = {}, {}
    for name in impls:
        f = jax.jit(lambda q, k, v, n=name: attention(q, k, v, seg, ls, capture_mode="official",
                                                       implementation=n))
        c = f.lower(q, k, v).compile()
        temps[name] = c.memory_analysis().temp_size_in_bytes / 2 ** 20
        progs[f"core/{name}"] = (c, (q, k, v))
    mm = jax.random.normal(jax.random.key(1), (2, 2048, 2048), jnp.float32)
    progs["matmul"] = (jax.jit(lambda m: jnp.dot(m[0], m[1])).lower(mm).compile(), (mm,))

    if args.forward:
        from bench.sampler import EditSpec, load_transformer_config, make_inputs, random_state
        from editmgt_jax.models.transformer import EditTransformer

        cfg = load_transformer_config("medium")
        spec = EditSpec()
        x = make_inputs(cfg, spec)
        ids = jnp.full((2, 64, 64), cfg.mask_token_id, jnp.int32)
        ref = jnp.concatenate([x["ref_ids"]] * 2)
        text = jnp.concatenate([x["neg_text"], x["text"]])
        pooled = jnp.concatenate([x["neg_pooled"], x["pooled"]])
        micro = jnp.concatenate([x["micro"]] * 2)
        t = jnp.full((2,), 11, jnp.int32)
        blocks = tuple(range(cfg.num_layers, cfg.num_blocks))
        for name in impls:
            graphdef, state = random_state(lambda n=name: EditTransformer(cfg, rngs=nnx.Rngs(0), attention=n))

            def fwd(st, *a, g=graphdef):
                return nnx.merge(g, st)(*a, reference_strength=1.1, capture_blocks=blocks)

            c = jax.jit(fwd).lower(state, ids, ref, text, pooled, micro, t).compile()
            progs[f"forward/{name}"] = (c, (state, ids, ref, text, pooled, micro, t))

    outs = {n: jax.block_until_ready(c(*a)) for n, (c, a) in progs.items()}   # warm-up
    ref_core = outs[f"core/{impls[0]}"]
    errs = {n: float(jnp.abs(outs[f"core/{n}"][0] - ref_core[0]).max()) for n in impls}
    if args.forward:
        ref_fwd = outs[f"forward/{impls[0]}"][0]
        fwd_argmax = {n: float(jnp.mean(jnp.argmax(outs[f"forward/{n}"][0], -1) != jnp.argmax(ref_fwd, -1)))
                      for n in impls}
    del outs
    times = {n: [] for n in progs}
    names = list(progs)
    for r in range(args.repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            c, a = progs[n]
            t0 = time.perf_counter()
            jax.block_until_ready(c(*a))
            times[n].append(time.perf_counter() - t0)
    load1 = os.getloadavg()
    med = {n: statistics.median(t) for n, t in times.items()}
    peak = 2 * 2048 ** 3 / med["matmul"] / 1e9
    base = impls[0]
    table = (f"| program | implementation | median (s) | rounds (s) | vs {base} | XLA temporaries (MiB) "
             f"| max abs diff vs {base} |\n|---|---|---|---|---|---|---|\n")
    for n in names:
        if n == "matmul":
            continue
        kind, impl = n.split("/")
        extra = (f"{temps[impl]:.0f} | {errs[impl]:.1e}" if kind == "core"
                 else f" | argmax differs at {fwd_argmax[impl]:.2%} of positions")
        table += (f"| {kind} | {impl} | {med[n]:.3f} | {', '.join(f'{x:.2f}' for x in times[n])} "
                  f"| {med[f'{kind}/{base}'] / med[n]:.2f}x | {extra} |\n")
    table += f"| matmul 2048^3 fp32 | | {med['matmul']:.3f} | | | {peak:.0f} GFLOP/s | |\n"
    meta = (f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs; 1/5/15-min "
            f"load average {'/'.join(f'{x:.1f}' for x in load0)} at the start, "
            f"{'/'.join(f'{x:.1f}' for x in load1)} at the end")
    print(table)
    print(meta)
    if not args.no_record:
        from bench.results import append_to_section
        command = "python -m bench.attention " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        append_to_section("## Attention", f"\n`{command}` ({datetime.date.today().isoformat()}; {meta})\n\n"
                          + table, intro=__doc__.split("\n\n", 2)[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
