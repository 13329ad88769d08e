"""Where the time of one compiled transformer forward goes, by part of the model.

    python -m bench.forward_profile [--config medium] [--px 1024] [--text-len 256] [--repeats 2]

Traces the compiled forward on the CFG batch of the edit of PERFORMANCE.md (the medium configuration
with random weights, 1024 px: a 64x64 id grid, 256 text tokens, reference strength 1.1, the
text-to-image attention captured from every single-stream block) with ``jax.profiler``, and
attributes each executed XLA op (thunk) to a part of the model through the named scopes the model
puts on its ops (``attention_core``, ``rope``, ``logits_head``, ``dual_block_i``,
``single_block_i``) and to matmul or element-wise work by its HLO instruction. Thunk times are
summed over the threads that ran them and scaled to the forward's wall time, so the shares add up
to one forward. ``profile_rows`` is reused by ``bench.vs_official``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

# Trace events that wrap or mark other events rather than run an op.
_NOT_OPS = ("ThunkExecutor::", "ThreadpoolListener::", "SlinkyThreadPool::", "end: ")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMP = re.compile(r"^\s*(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_MATMUL_OPS = (" dot(", " convolution(", "__ynn_fusion", "__onednn", "__xnn_fusion")

PARTS = ("attention core", "rope", "logits head", "block matmuls (projections, MLP)",
         "block element-wise (norms, modulation, residuals, copies)", "embeddings and the rest",
         "ops of other programs (not in this module)")


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, bool]]:
    """``instruction name -> (op_name metadata, is_matmul)`` of a compiled module's text."""
    comps_with_matmul: set[str] = set()
    current = None
    for line in hlo_text.splitlines():
        m = _COMP.match(line)
        if m and "=" not in line.split("{")[0]:
            current = m.group(1)
            continue
        if current and any(t in line for t in (" dot(", " convolution(")):
            comps_with_matmul.add(current)
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, rest = m.groups()
        op = _OP_NAME.search(rest)
        calls = _CALLS.search(rest)
        matmul = any(t in rest for t in _MATMUL_OPS) or bool(calls and calls.group(1) in comps_with_matmul)
        out[name] = (op.group(1) if op else "", matmul)
    return out


def part_of(op_name: str, matmul: bool) -> str:
    if "attention_core" in op_name:
        return PARTS[0]
    if "/rope" in op_name:
        return PARTS[1]
    if "logits_head" in op_name:
        return PARTS[2]
    if "_block_" in op_name:
        return PARTS[3] if matmul else PARTS[4]
    return PARTS[5]


def thunk_seconds(run, trace_dir: str) -> tuple[dict[str, float], float]:
    """Run ``run()`` (which blocks until its result is ready) under the profiler; returns the summed
    seconds per executed thunk name over all threads, and the wall time of the run."""
    import jax
    from jax.profiler import ProfileData

    jax.profiler.start_trace(trace_dir)
    t0 = time.perf_counter()
    run()
    wall = time.perf_counter() - t0
    jax.profiler.stop_trace()
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        raise RuntimeError(f"{trace_dir}: the profiler wrote no trace")
    per = collections.Counter()
    for plane in ProfileData.from_file(files[-1]).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):     # XLA's threads only (not Python's or tqdm's)
                continue
            for e in line.events:
                if not e.name.startswith(_NOT_OPS) and e.duration_ns > 0:
                    per[e.name] += e.duration_ns / 1e9
    return dict(per), wall


def profile_rows(compiled, args: tuple, repeats: int = 1) -> tuple[list[tuple[str, float, float]], float]:
    """``([(part, seconds per call, share)], wall seconds per call)`` for ``compiled(*args)``; seconds
    are the part's share of the summed thunk time times the wall time."""
    import jax

    ops = hlo_ops(compiled.as_text())
    jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory() as d:
        per, wall = thunk_seconds(lambda: [jax.block_until_ready(compiled(*args)) for _ in range(repeats)], d)
    wall /= repeats
    parts = collections.Counter()
    for name, s in per.items():
        if name in ops:
            parts[part_of(*ops[name])] += s
        else:
            parts[PARTS[-1]] += s
    total = sum(parts.values()) or 1.0
    rows = [(p, parts[p] / total * wall, parts[p] / total) for p in PARTS if parts.get(p)]
    return rows, wall


def forward_program(cfg, px: int, text_len: int, capture: bool = True, batch: int = 1):
    """The compiled transformer forward on the CFG batch (``2 * batch``) at ``px`` and its arguments."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bench.sampler import EditSpec, make_inputs, random_state
    from editmgt_jax.models.transformer import EditTransformer

    g = px // 16
    spec = EditSpec(id_grid=(g, g), text_len=text_len, batch=batch)
    x = make_inputs(cfg, spec)
    ids = jnp.full((2 * batch, g, g), cfg.mask_token_id, jnp.int32)
    ref = jnp.concatenate([x["ref_ids"]] * 2)
    text = jnp.concatenate([x["neg_text"], x["text"]])
    pooled = jnp.concatenate([x["neg_pooled"], x["pooled"]])
    micro = jnp.concatenate([x["micro"]] * 2)
    t = jnp.full((2 * batch,), 3, jnp.int32)
    blocks = tuple(range(cfg.num_layers, cfg.num_blocks)) if capture else ()
    graphdef, state = random_state(lambda: EditTransformer(cfg, rngs=nnx.Rngs(0)))

    def fwd(st, *a):
        return nnx.merge(graphdef, st)(*a, reference_strength=1.1, capture_blocks=blocks)

    args = (state, ids, ref, text, pooled, micro, t)
    return jax.jit(fwd).lower(*args).compile(), args


def format_rows(rows, wall: float, flops: float | None = None, peak: float | None = None) -> str:
    out = "| part of the forward | seconds | share |\n|---|---|---|\n"
    for p, s, share in rows:
        out += f"| {p} | {s:.3f} | {share:.0%} |\n"
    out += f"| **forward (wall)** | **{wall:.3f}** | |\n"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.forward_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="medium", choices=["tiny", "medium"])
    p.add_argument("--px", type=int, default=1024)
    p.add_argument("--text-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", default="1", help="edits per call (model batch 2x), comma-separated to compare")
    args = p.parse_args(argv)
    if args.px % 32:
        print(f"error: --px {args.px}: must be a multiple of 32", file=sys.stderr)
        return 2
    from bench.sampler import load_transformer_config

    cfg = load_transformer_config(args.config)
    for b in (int(x) for x in args.batch.split(",")):
        compiled, fargs = forward_program(cfg, args.px, args.text_len, batch=b)
        rows, wall = profile_rows(compiled, fargs, args.repeats)
        print(f"{args.config} forward, {b} edit(s) (model batch {2 * b}), {args.px} px, {args.text_len} text "
              f"tokens; {wall / b:.3f} s per edit; load average {os.getloadavg()[0]:.1f}")
        print(format_rows(rows, wall))
        del compiled, fargs
    return 0


if __name__ == "__main__":
    sys.exit(main())
