"""Side by side with the official PyTorch pipeline: the same random release, the same edit settings.

    python -m bench.vs_official --official-src CHECKOUT --official-python PY [--size 1024] [--steps 12]
        [--rounds 3] [--threads 2] [--record]

``CHECKOUT`` is a local checkout of the official repository (weichow23/EditMGT); ``PY`` a Python with
PyTorch, diffusers, transformers and peft (what the checkout imports). The official code is only
imported from the checkout, by ``bench/official_side.py`` running under ``PY``.

1. Lays out a random release in the official folder layout under ``--workdir``: the transformer of
   ``--config`` (default the medium benchmark configuration), a VQ of the fixture's shape (channels 8,
   16x down-sampling) with the transformer's codebook size, CLIP and Gemma-2 text encoders of the
   fixture's shape with the widths the transformer expects, small tokenizers; the weights are drawn by
   the official classes (seeded) under ``PY``.
2. Converts the release with ``editmgt_jax.convert``.
3. Times both pipelines on the same source image and instruction in alternating rounds (the order
   flips every round), each side timing only its edit call, after one untimed warm-up edit each (ours
   compiles there): ``--size`` px, ``--steps``, CFG 6, reference strength 1.1, consolidation over the
   single-stream blocks, lambda 0.3.
4. One transformer forward per step, each side: the official's from its transformer calls during the
   timed edits (summed per step), ours a compiled forward on the CFG batch.
5. Both frameworks' float32 matmul peaks (2048^3) in the same run, and the load average before and
   after. Ratios are official / ours (above 1: ours is faster).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

from bench.peak import matmul_peak
from bench.forward_profile import format_rows, profile_rows
from bench.full_release import rss_bytes
from bench.sampler import _flops

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "editmgt-tiny-v1")
SIDE = os.path.join(HERE, "official_side.py")


def _read(path):
    with open(path) as fh:
        return json.load(fh)


def _write(path, doc):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=2)


def write_release_configs(release: str, transformer_cfg: dict) -> None:
    """Configs and tokenizers of the random release (weights come from ``official_side.py layout``)."""
    from editmgt_jax.tools.tiny_release import write_tokenizers

    _write(os.path.join(release, "editmgt", "config.json"), transformer_cfg)
    vq = _read(os.path.join(FIXTURE, "vqvae_config.json"))
    vq["num_vq_embeddings"] = int(transformer_cfg["codebook_size"])
    _write(os.path.join(release, "vqvae", "config.json"), vq)
    clip = _read(os.path.join(FIXTURE, "clip_text_config.json"))
    clip["projection_dim"] = int(transformer_cfg["pooled_projection_dim"])
    _write(os.path.join(release, "text_encoder", "config.json"), clip)
    gemma = _read(os.path.join(FIXTURE, "gemma2_config.json"))
    gemma["hidden_size"] = int(transformer_cfg["joint_attention_dim"])
    _write(os.path.join(release, "llm_encoder", "config.json"), gemma)
    write_tokenizers(release, clip["vocab_size"], gemma["vocab_size"])


def _side(python: str, *args, **kw):
    return subprocess.run([python, SIDE, *args], check=True, **kw)


class Official:
    """The official pipeline in a child process (one JSON request / reply per line)."""

    def __init__(self, python: str, src: str, release: str, threads: int):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen([python, SIDE, "serve", src, release, str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._reply()

    def _reply(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the official side exited (code {self.proc.wait()})")
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self):
        try:
            self.ask(op="quit")
        except (RuntimeError, BrokenPipeError, ValueError):
            pass
        self.proc.wait(timeout=60)


def our_forward_program(editor, size: int, text_len: int, *, attention: str | None = None, run: bool = True):
    """The compiled transformer forward on the CFG batch (2) at ``size`` px, with the edit's
    consolidation captures, and its arguments; ``attention`` swaps the attention implementation,
    ``run`` makes one untimed call."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    tr = editor.tr_cfg
    g = size // editor.vq_cfg.downsample_factor
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, tr.codebook_size, (2, g, g)), jnp.int32)
    text = jnp.asarray(rng.standard_normal((2, text_len, tr.joint_attention_dim), dtype=np.float32))
    pooled = jnp.asarray(rng.standard_normal((2, tr.pooled_projection_dim), dtype=np.float32))
    micro = jnp.tile(jnp.asarray([[size, size, 0.0, 0.0, 6.0]], jnp.float32), (2, 1))
    blocks = tuple(range(tr.num_layers, tr.num_blocks))
    graphdef, state = editor.graphdefs["transformer"], editor.states["transformer"]
    if attention is not None:
        model = nnx.merge(graphdef, state)
        model.attention = attention
        graphdef, state = nnx.split(model)

    def fwd(st, ids, ref, text, pooled, micro):
        return nnx.merge(graphdef, st)(ids, ref, text, pooled, micro, jnp.full((2,), 3, jnp.int32),
                                       reference_strength=1.1, capture_blocks=blocks)

    args = (state, ids, ids, text, pooled, micro)
    compiled = jax.jit(fwd).lower(*args).compile()
    if run:
        jax.block_until_ready(compiled(*args))
    return compiled, args


def forward_flops(editor, size: int, text_len: int) -> float | None:
    """FLOPs of ``our_forward_program`` by XLA's cost analysis, counted on the same model with the
    naive attention (full logits, no loops: the blocked core's loops would be counted once instead
    of once per iteration). Compiled, not run."""
    return _flops(our_forward_program(editor, size, text_len, attention="naive", run=False)[0])


def _timed(compiled, args) -> float:
    import jax

    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - t


def main(argv=None) -> int:
    from editmgt_jax import host_memory

    host_memory.keep()   # as infer.edit and infer.app run (EDITMGT_KEEP_HOST_MEMORY=off: not)
    p = argparse.ArgumentParser(prog="python -m bench.vs_official", description=__doc__.split("\n\n")[0])
    p.add_argument("--official-src", required=True, help="checkout of the official repository")
    p.add_argument("--official-python", required=True, help="a Python with torch, diffusers, transformers, peft")
    p.add_argument("--config", default=os.path.join(HERE, "medium_transformer_config.json"))
    p.add_argument("--workdir", default="/tmp/editmgt-vs-official")
    p.add_argument("--size", type=int, default=1024, help="edit size (the official pipeline: 1024 only)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads (the official side)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=4,
                   help="our batched edit for the throughput ratio (batch N vs batch 1; 0: skip)")
    p.add_argument("--batch-steps", type=int, default=4,
                   help="steps of the two throughput edits (timed apart from the rounds)")
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.official_src, "src", "pipeline.py")):
        print(f"error: --official-src {args.official_src}: no src/pipeline.py (not an official checkout)",
              file=sys.stderr)
        return 2
    if shutil.which(args.official_python) is None and not os.access(args.official_python, os.X_OK):
        print(f"error: --official-python {args.official_python}: not an executable", file=sys.stderr)
        return 2
    if args.size != 1024:
        # The official pipeline builds its rotary position ids for a 1024 px edit only (it doubles
        # the id grid when height != 1024, which then no longer matches the token count).
        print(f"error: --size {args.size}: the official pipeline runs at 1024 px only", file=sys.stderr)
        return 2
    load0 = os.getloadavg()

    import jax

    from editmgt_jax.convert.release import convert_release
    from editmgt_jax.editor import Editor

    release = os.path.join(args.workdir, "release")
    ckpt = os.path.join(args.workdir, "ckpt")
    shutil.rmtree(args.workdir, ignore_errors=True)
    write_release_configs(release, _read(args.config))
    print("laying out the random release (official classes) ...", flush=True)
    _side(args.official_python, "layout", args.official_src, release, str(args.seed))
    convert_release(release, ckpt, log=lambda m: None)

    editor = Editor.load(ckpt)
    tr = editor.tr_cfg
    blocks = list(range(tr.num_layers, tr.num_blocks))
    settings = dict(steps=args.steps, guidance_scale=6.0, reference_strength=1.1, hold_threshold=0.3)
    rng = np.random.default_rng(args.seed)
    image = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    instruction = "make the sky red"

    official = Official(args.official_python, args.official_src, release, args.threads)
    try:
        req = dict(op="edit", size=args.size, instruction=instruction, image=image.tolist(), blocks=blocks,
                   seed=args.seed, **settings)

        our_use = []      # per timed edit of ours: CPU seconds, minor page faults, resident MiB after

        def ours():
            r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            editor.edit([image], [instruction], seed=args.seed, size=args.size,
                        consolidation_blocks=tuple(blocks), **settings)
            wall, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
            our_use.append((r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime,
                            r1.ru_minflt - r0.ru_minflt, rss_bytes() / 2 ** 20))
            return wall

        text_len = 256
        fwd_prog, fwd_args = our_forward_program(editor, args.size, text_len)
        warm_ours = ours()                      # compiles
        warm_off = official.ask(**req)["edit_s"]
        off_s, our_s, off_fwd, our_fwd_s, xla_mm, torch_mm = [], [], [], [], [], []
        for r in range(args.rounds):
            order = ("official", "ours") if r % 2 == 0 else ("ours", "official")
            for side in order:
                if side == "ours":
                    our_s.append(ours())
                    our_fwd_s.append(_timed(fwd_prog, fwd_args))
                    xla_mm.append(matmul_peak(2048, calls=5) / 1e9)
                else:
                    rep = official.ask(**req)
                    off_s.append(rep["edit_s"])
                    calls = rep["forward_s"]
                    off_fwd.append(sum(calls) / args.steps)   # the transformer's time per step
                    torch_mm.append(official.ask(op="matmul", n=2048)["gflops"])
            cpu, faults, rss = our_use[-1]
            print(f"round {r + 1}: official {off_s[-1]:.2f} s, ours {our_s[-1]:.2f} s (CPU {cpu:.1f} s, "
                  f"{faults} minor page faults, RSS {rss:.0f} MiB), our forward {our_fwd_s[-1]:.2f} s, "
                  f"fp32 matmul 2048^3: XLA {xla_mm[-1]:.0f}, torch {torch_mm[-1]:.0f} GFLOP/s", flush=True)
        torch_version = official.info.get("torch")
    finally:
        official.close()

    # Batch throughput (ours): the same edit for ``--batch`` images at once against one, both with
    # ``--batch-steps`` steps, each compiled by an untimed first call, then alternated.
    tput = None
    if args.batch > 1:
        imgs = [np.roll(image, 37 * i, axis=1) for i in range(args.batch)]

        def batch_edit(n):
            t = time.perf_counter()
            editor.edit(imgs[:n], [instruction] * n, seed=args.seed, size=args.size,
                        consolidation_blocks=tuple(blocks), **{**settings, "steps": args.batch_steps})
            return time.perf_counter() - t

        batch_edit(1), batch_edit(args.batch)
        one, many = [], []
        for r in range(2):
            for n in ((1, args.batch) if r % 2 == 0 else (args.batch, 1)):
                (one if n == 1 else many).append(batch_edit(n))
        tput = (statistics.median(one), statistics.median(many))
        print(f"batch 1: {tput[0]:.2f} s, batch {args.batch}: {tput[1]:.2f} s per edit call", flush=True)

    # Where our forward's time goes, and its FLOP count (XLA's cost analysis).
    prof_rows, prof_wall = profile_rows(fwd_prog, fwd_args)
    flops = forward_flops(editor, args.size, text_len)
    load1 = os.getloadavg()

    med = statistics.median
    xla_peak, torch_peak = med(xla_mm), med(torch_mm)
    our_fwd = med(our_fwd_s)
    rows = [("whole edit (median of rounds)", med(off_s), med(our_s)),
            ("transformer per step (CFG batch)", med(off_fwd), our_fwd)]
    table = ("| | official (PyTorch %s, %d threads) | ours (jax) | official / ours |\n|---|---|---|---|\n"
             % (torch_version, args.threads))
    for name, a, b in rows:
        table += f"| {name} | {a:.2f} s | {b:.2f} s | {a / b:.2f} |\n"
    table += f"| fp32 matmul 2048^3 (median of rounds) | {torch_peak:.0f} GFLOP/s | {xla_peak:.0f} GFLOP/s | |\n"

    # Our edit's cost per step inside the compiled loop and its fixed part (text encoders, VQ encode
    # and decode, compositing), from the batch-1 edits with --steps and --batch-steps steps.
    loop_step = fixed = None
    if tput and args.steps != args.batch_steps:
        loop_step = (med(our_s) - tput[0]) / (args.steps - args.batch_steps)
        fixed = med(our_s) - args.steps * loop_step
    targets = [("whole edit, official / ours", ">= 2.5x", f"{med(off_s) / med(our_s):.2f}x",
                med(off_s) / med(our_s) >= 2.5)]
    if flops:
        achieved = flops / our_fwd / 1e9
        targets.append(("our forward, share of the same run's XLA matmul peak", ">= 70%",
                        f"{achieved / xla_peak:.0%} ({flops / 1e9:.0f} GFLOP in {our_fwd:.2f} s = "
                        f"{achieved:.0f} GFLOP/s)", achieved / xla_peak >= 0.7))
    if loop_step is not None:
        outside = 1.0 - our_fwd / loop_step
        targets.append(("everything outside the transformer, share of a step (1 - forward / step in the loop)",
                        "< 3%", f"{outside:.1%} (step in the loop {loop_step:.2f} s, forward alone {our_fwd:.2f} s; "
                        f"fixed part of an edit {fixed:.1f} s = {fixed / med(our_s):.1%})", outside < 0.03))
    if tput:
        ratio = args.batch * tput[0] / tput[1]
        targets.append((f"batch {args.batch} throughput / batch 1 ({args.batch_steps}-step edits)", ">= 1.5x",
                        f"{ratio:.2f}x ({tput[0]:.1f} s for 1 edit, {tput[1]:.1f} s for {args.batch})",
                        ratio >= 1.5))
    table += "\n| target | wanted | measured | met |\n|---|---|---|---|\n"
    for name, want, got, ok in targets:
        table += f"| {name} | {want} | {got} | {'yes' if ok else '**no**'} |\n"
    table += f"\nWhere our forward's time goes (``bench.forward_profile``: one traced forward, {prof_wall:.2f} s):\n\n"
    table += format_rows(prof_rows, prof_wall)
    meta = (f"{args.size} px, {args.steps} steps, CFG 6, strength 1.1, consolidation over blocks "
            f"{blocks[0]}-{blocks[-1]}, lambda 0.3, {args.rounds} alternating rounds after one warm-up "
            f"each (warm-up: official {warm_off:.1f} s, ours {warm_ours:.1f} s incl. compile); "
            f"1/5/15-min load average {'/'.join(f'{x:.1f}' for x in load0)} before, "
            f"{'/'.join(f'{x:.1f}' for x in load1)} after; per round official "
            f"{', '.join(f'{x:.1f}' for x in off_s)} s, ours {', '.join(f'{x:.1f}' for x in our_s)} s")
    print(table)
    print(meta)
    if args.record:
        from bench.results import append_to_section
        command = "python -m bench.vs_official " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        append_to_section("## Versus the official pipeline",
                          f"\n`{command}` ({datetime.date.today().isoformat()})\n\n{meta}\n\n{table}",
                          intro=__doc__.split("\n\n", 2)[2].split("\n\n")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
