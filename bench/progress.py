"""Cost of the progress bar over sampling steps: one edit with and without the per-step host callback.

    python -m bench.progress [--steps 100] [--repeats 5] [--no-record]

The shipped default model (64 px, 16x16 tokens): its steps are the cheapest of any model here, so
the callback's share of a step is at its largest. Both programs are compiled first (one warm-up
call each), then timed in interleaved rounds (order alternating); medians over rounds are reported
and the ratio ``with / without``. The bar is forced on (``after_s=0``, drawn into /dev/null) so its
drawing is included. Under load the edit times are noisy, so the callback is also timed alone: a
compiled ``fori_loop`` of 2,000 trivial iterations with and without it gives its cost per call,
to set against a step's time. Appended to bench/RESULTS.md under "## Progress bar" unless ``--no-record``.
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


def callback_cost(progress, n: int = 2000, repeats: int = 5) -> float:
    """Seconds per call of ``jax.debug.callback(progress, x)`` inside a compiled loop."""
    import jax
    import jax.numpy as jnp

    def loop(with_callback):
        def body(i, x):
            if with_callback:
                jax.debug.callback(progress, x)
            return x * 1.0000001 + 1.0
        return jax.jit(lambda x: jax.lax.fori_loop(0, n, body, x))

    fns = {c: loop(c) for c in (False, True)}
    times: dict[bool, list[float]] = {False: [], True: []}
    for c, f in fns.items():
        progress.start(n)
        f(jnp.float32(0)).block_until_ready()
    for r in range(repeats):
        for c in ((False, True) if r % 2 == 0 else (True, False)):
            progress.start(n)
            t0 = time.perf_counter()
            fns[c](jnp.float32(0)).block_until_ready()
            times[c].append(time.perf_counter() - t0)
            progress.finish()
    return (statistics.median(times[True]) - statistics.median(times[False])) / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.progress", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)

    import numpy as np

    from editmgt_jax.editor import Editor, StepProgress

    editor = Editor.load()
    devnull = open(os.devnull, "w")
    editor.progress = StepProgress(after_s=0.0, stream=devnull)
    image = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "shapes.png")
    kw = dict(steps=args.steps, seed=0)
    instruction = "paint the orange circle at the top cyan"
    results = {}
    for progress in (False, True):   # compile + warm up
        results[progress] = editor.edit(image, instruction, progress=progress, **kw).tokens
    assert np.array_equal(results[False], results[True])
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.repeats):
        for progress in ((False, True) if r % 2 == 0 else (True, False)):
            t0 = time.perf_counter()
            editor.edit(image, instruction, progress=progress, **kw)
            times[progress].append(time.perf_counter() - t0)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    per_call = callback_cost(editor.progress)
    load = os.getloadavg()[0]
    table = (f"| steps | without (s/edit) | with bar (s/edit) | with / without | per step (ms) |\n"
             f"|---:|---:|---:|---:|---:|\n"
             f"| {args.steps} | {off:.3f} | {on:.3f} | {on / off:.3f} | {(on - off) / args.steps * 1e3:+.2f} |\n\n"
             f"The callback alone: {per_call * 1e6:.0f} us per call, {per_call / (off / args.steps):.2%} of "
             f"one step of this model here ({off / args.steps * 1e3:.1f} ms).")
    print(table)
    print("rounds (s): without", " ".join(f"{t:.2f}" for t in times[False]),
          "| with", " ".join(f"{t:.2f}" for t in times[True]))
    if not args.no_record:
        from bench.results import append_to_section

        cmd = "python -m bench.progress " + shlex.join(sys.argv[1:] if argv is None else argv)
        append_to_section(
            "## Progress bar",
            f"`{cmd.strip()}` ({datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, "
            f"load {load:.1f}, medians of {args.repeats} interleaved rounds; same tokens with and without)\n\n"
            + table,
            intro="Cost of `Editor.edit(..., progress=True)` (a host callback per sampling step) on the "
                  "shipped 64 px model, whose steps are the cheapest here.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
