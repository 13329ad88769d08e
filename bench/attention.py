"""Attention implementations on this machine: the core alone and the medium transformer forward.

    python -m bench.attention [--impls naive,xla] [--repeats 3] [--forward] [--grad] [--no-record]
    python -m bench.attention --impls xla@main,xla,xla/128,xla/512 --grad --repeats 9 --no-record

In one process, interleaved rounds (the order rotates every round), median of ``--repeats``:

* the attention core at the medium benchmark's shape (CFG batch 2, 8 heads x 64, 256 text + 1024
  image + 1024 reference tokens = 2304), reference strength 1.1, capture of the text rows on, for
  each implementation in ``--impls``; also XLA's temporary-buffer size of each compiled core. An
  implementation is a name of ``editmgt_jax.models.attention.IMPLEMENTATIONS``, optionally with
  ``/ROWS`` (the ``block_q`` of ``xla``) and ``@REV`` (``xla`` as the file
  ``editmgt_jax/models/attention.py`` is at git revision ``REV`` of this repository: a before/after
  pair in one run);
* with ``--grad``: the gradient of the core (``q, k, v``, the training direction), per implementation;
* with ``--forward``: one medium transformer forward on the CFG batch (1024 px: 64x64 ids, 32x32
  grid), capture over the single-stream blocks, random weights, per implementation;
* a 2048^3 float32 ``jnp.dot`` (the machine's matmul peak, same rounds).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time


@contextlib.contextmanager
def _implementation(spec: str):
    """``NAME[/ROWS][@REV]`` -> ``(NAME, ROWS or None)``; with ``@REV`` the ``xla`` core of that git
    revision is patched into ``editmgt_jax.models.attention`` while the caller traces."""
    from editmgt_jax.models import attention as module

    spec, _, rev = spec.partition("@")
    name, _, rows = spec.partition("/")
    if name not in module.IMPLEMENTATIONS:
        raise SystemExit(f"--impls: {name!r} is not one of {module.IMPLEMENTATIONS}")
    if rev and name != "xla":
        raise SystemExit(f"--impls: @{rev}: only the xla implementation can come from a revision")
    block_q = int(rows) if rows else None
    if not rev:
        yield name, block_q
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        source = subprocess.run(["git", "-C", root, "show", f"{rev}:editmgt_jax/models/attention.py"],
                                check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"--impls: @{rev}: {e.stderr.strip()}") from None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "attention_at_rev.py")
        with open(path, "w") as fh:
            fh.write(source)
        spec_ = importlib.util.spec_from_file_location(f"_attention_at_{rev}", path)
        old = importlib.util.module_from_spec(spec_)
        sys.modules[spec_.name] = old
        spec_.loader.exec_module(old)
        current = module._xla
        module._xla = old._xla
        try:
            yield name, block_q
        finally:
            module._xla = current


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--impls", default="naive,xla")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--forward", action="store_true", help="also the medium transformer forward")
    p.add_argument("--grad", action="store_true", help="also the gradient of the core")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    load0 = os.getloadavg()

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from editmgt_jax.models.attention import Segments, attention

    impls = args.impls.split(",")
    seg = Segments(256, 1024, 1024)
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, w = (jax.random.normal(kk, (2, 8, seg.total, 64), jnp.float32) for kk in ks)
    ls = jnp.log(jnp.float32(1.1))
    progs, temps = {}, {}
    for name in impls:
        with _implementation(name) as (impl, block_q):
            def core(q, k, v, impl=impl, block_q=block_q):
                return attention(q, k, v, seg, ls, capture_mode="official", implementation=impl,
                                 block_q=block_q)

            c = jax.jit(core).lower(q, k, v).compile()
            temps[name] = c.memory_analysis().temp_size_in_bytes / 2 ** 20
            progs[f"core/{name}"] = (c, (q, k, v))
            if args.grad:
                g = jax.jit(jax.grad(lambda q, k, v, core=core: jnp.sum(core(q, k, v)[0] * w), (0, 1, 2)))
                progs[f"grad/{name}"] = (g.lower(q, k, v).compile(), (q, k, v))
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
            with _implementation(name) as (impl, block_q):
                if block_q:
                    raise SystemExit(f"--forward: {name}: no block size with the transformer (use @REV)")
                graphdef, state = random_state(lambda n=impl: EditTransformer(cfg, rngs=nnx.Rngs(0), attention=n))

                def fwd(st, *a, g=graphdef):
                    return nnx.merge(g, st)(*a, reference_strength=1.1, capture_blocks=blocks)

                c = jax.jit(fwd).lower(state, ids, ref, text, pooled, micro, t).compile()
                progs[f"forward/{name}"] = (c, (state, ids, ref, text, pooled, micro, t))

    outs = {n: jax.block_until_ready(c(*a)) for n, (c, a) in progs.items()}   # warm-up
    ref_core = outs[f"core/{impls[0]}"]
    errs = {n: float(jnp.abs(outs[f"core/{n}"][0] - ref_core[0]).max()) for n in impls}
    if args.grad:
        ref_grad = outs[f"grad/{impls[0]}"]
        gerrs = {n: max(float(jnp.abs(a - b).max()) for a, b in zip(outs[f"grad/{n}"], ref_grad))
                 for n in impls}
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
        kind, impl = n.split("/", 1)
        extra = (f"{temps[impl]:.0f} | {errs[impl]:.1e}" if kind == "core"
                 else f" | {gerrs[impl]:.1e}" if kind == "grad"
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
