"""Steady speed: many consecutive edits in one process, each timed against the median.

    python -m bench.steady [--mode editor|loop|both] [--edits 50] [--steps 8] [--no-record]

``editor``: the public API a demo or a server uses, ``Editor.load()`` (the shipped default model)
and ``Editor.edit`` of one image per call (text encoding, the compiled edit program, compositing on
the host), the same instruction with a new seed each call. ``loop``: the medium transformer
(bench/medium_transformer_config.json, random weights) at a small size (16x16 ids, 64 text tokens):
the compiled sampling loop alone (bench.sampler's edit), called again and again on the same inputs.

After one warm-up call (the compile), each edit's wall time is recorded together with what could
make later edits slower: the process's resident memory, the number of live device arrays, the
number of compiled programs the Editor holds, the Python objects gc tracks, and the CPU time the
process got (on a shared machine a slow edit with normal CPU time was waiting for a core, not
working more). The report: median, the edits outside +-10% of it, the ratio of the last ten edits
to the first ten, and the growth of each counter. Appended to bench/RESULTS.md under
"## Steady speed" unless ``--no-record``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import resource
import shlex
import statistics
import sys
import time

import numpy as np

from bench.full_release import rss_bytes
from bench.results import RESULTS, append_to_section

HEADING = "## Steady speed"
BAND = 0.10
MIB = 1024 ** 2


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def editor_calls(steps: int):
    """``(call(i), programs())``: one ``Editor.edit`` of the example image per call (seed ``i``)."""
    from editmgt_jax.editor import Editor

    editor = Editor.load()
    image = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "shapes.png")

    def call(i):
        return editor.edit(image, "paint the orange circle at the top cyan", seed=i, steps=steps).images

    return call, lambda: len(editor._programs)


def loop_calls(steps: int):
    """``(call(i), programs())``: the medium transformer's compiled sampling loop at 16x16 ids."""
    from bench.accelerator_check import Plan, build_edit

    plan = Plan(transformer="medium", id_grid=(16, 16), text_len=64, steps=steps, batches=(1,),
                attention_shapes=(), train_config="", train_steps=0, timed_calls=0)
    run, _, _ = build_edit(plan, "float32", 1)
    return (lambda i: run()), lambda: 1


def measure(mode: str, edits: int, steps: int, log=print) -> dict:
    import jax

    call, programs = (editor_calls if mode == "editor" else loop_calls)(steps)
    t = time.perf_counter()
    jax.block_until_ready(call(-1))
    first_s = time.perf_counter() - t
    rows = []
    for i in range(edits):
        c0, t0 = _cpu_s(), time.perf_counter()
        jax.block_until_ready(call(i))
        wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
        rows.append(dict(wall=wall, cpu=cpu, rss=rss_bytes() / MIB, live=len(jax.live_arrays()),
                         programs=programs(), gc=len(gc.get_objects())))
        if i % 10 == 9:
            log(f"[{mode}] {i + 1}/{edits}: {wall:.3f} s")
    walls = np.array([r["wall"] for r in rows])
    med = float(np.median(walls))
    out = {
        "mode": mode, "edits": edits, "steps": steps, "first_s": first_s, "median_s": med,
        "min_s": float(walls.min()), "max_s": float(walls.max()),
        "outside": int(np.sum(np.abs(walls / med - 1) > BAND)),
        "first10_s": float(np.median(walls[:10])), "last10_s": float(np.median(walls[-10:])),
        "cpu_median_s": float(np.median([r["cpu"] for r in rows])), "rows": rows,
        "cpu_last10_vs_first10": float(np.median([r["cpu"] for r in rows[-10:]])
                                       / np.median([r["cpu"] for r in rows[:10]])),
    }
    for k in ("rss", "live", "programs", "gc"):
        out[f"{k}_first"], out[f"{k}_last"] = rows[0][k], rows[-1][k]
    # on a shared machine: the edits that took long without using more CPU waited for a core
    out["outside_with_normal_cpu"] = int(sum(
        1 for r in rows if abs(r["wall"] / med - 1) > BAND and abs(r["cpu"] / out["cpu_median_s"] - 1) <= BAND))
    return out


def results_text(reports: list[dict], command: str) -> str:
    lines = [f"### {datetime.date.today().isoformat()}: `{command}`", "",
             f"Host {platform.node() or '?'}, {os.cpu_count()} CPUs, load average at the end "
             f"{os.getloadavg()[0]:.1f}.", "",
             "| mode | edits | steps | first call s | median s | min / max vs median | outside +-10% "
             "| of those with normal CPU time | last 10 / first 10 | CPU s per edit | CPU last 10 / first 10 | RSS MiB first -> last "
             "| live arrays | programs | gc objects |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        med = r["median_s"]
        lines.append(
            f"| {r['mode']} | {r['edits']} | {r['steps']} | {r['first_s']:.2f} | {med:.3f} | "
            f"{r['min_s'] / med:.2f} / {r['max_s'] / med:.2f} | {r['outside']} | {r['outside_with_normal_cpu']} | "
            f"{r['last10_s'] / r['first10_s']:.3f} | {r['cpu_median_s']:.3f} | {r['cpu_last10_vs_first10']:.3f} | {r['rss_first']:.0f} -> {r['rss_last']:.0f} | "
            f"{r['live_first']} -> {r['live_last']} | {r['programs_first']} -> {r['programs_last']} | "
            f"{r['gc_first']} -> {r['gc_last']} |")
        walls = ", ".join(f"{x['wall']:.2f}" for x in r["rows"])
        cpus = ", ".join(f"{x['cpu']:.2f}" for x in r["rows"])
        lines += ["", f"{r['mode']} per-edit wall seconds: {walls}", "", f"{r['mode']} per-edit CPU seconds: {cpus}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.steady", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("editor", "loop", "both"), default="both")
    p.add_argument("--edits", type=int, default=50)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    if args.edits < 10:
        print(f"error: --edits {args.edits}: at least 10 (first and last ten are compared)", file=sys.stderr)
        return 2
    if args.steps < 1:
        print(f"error: --steps {args.steps}: must be >= 1", file=sys.stderr)
        return 2
    import editmgt_jax  # noqa: F401

    modes = ("editor", "loop") if args.mode == "both" else (args.mode,)
    reports = [measure(m, args.edits, args.steps, log=lambda s: print(s, file=sys.stderr, flush=True))
               for m in modes]
    command = "python -m bench.steady " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = results_text(reports, command.strip())
    print(text)
    if not args.no_record:
        append_to_section(HEADING, text, path=RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
