"""Steady speed: many consecutive edits in one process, each timed against the median.

    python -m bench.steady [--mode editor|loop|both] [--edits 50] [--steps 8] [--checkpoint CKPT|tiny]
                           [--ids 16] [--interleave] [--control] [--fresh] [--check] [--no-record]

``editor``: the public API a demo or a server uses, ``Editor.load()`` (the shipped default model)
and ``Editor.edit`` of one image per call (text encoding, the compiled edit program, compositing on
the host), the same instruction with a new seed each call (``--checkpoint``: another model folder; ``tiny``: the
tiny fixture model of tests/fixtures/editmgt-tiny-v1 in the official release layout, converted
into a temporary folder; ``--interleave``: between two timed edits, untimed, the other work the
side-by-side harness runs in our process, a transformer forward program and the matmul peak).
``loop``: the medium transformer
(bench/medium_transformer_config.json, random weights) at ``--ids`` x ``--ids`` image tokens (16:
256 px; 32: 512 px; 64: 1024 px) and 64 text tokens: the compiled sampling loop alone (bench.sampler's
edit), called again and again on the same inputs.

``--control``: after each edit, untimed for the edit, the machine's own speed at that moment: the
best of five 2048^3 float32 matmuls (bench.peak, compiled once). When the edits' CPU time drifts,
this tells the machine (a host that got slower slows the matmul as much) from the process (the
matmul stays where it was while the edit slows). ``--fresh``: before every tenth edit, the same edit
in a new process (after its own warm-up; two timed calls): the process this run has grown cannot
slow it, a slower machine does. The long-lived process's CPU time per edit over the fresh
process's, block by block, stays flat when the drift is the machine's.

After one warm-up call (the compile), each edit's wall time is recorded together with what could
make later edits slower: the process's resident memory, the number of live device arrays, the
number of compiled programs the Editor holds, the XLA compilations and jaxpr traces jax made
during the edit (``jax.monitoring``: a program compiled again on every call shows here), the Python
objects gc tracks, and the CPU time the process got (on a shared machine a slow edit with normal CPU time was waiting for a core, not
working more). The report: median, the edits outside +-10% of it, the ratio of the last ten edits
to the first ten (wall and CPU time), the resident memory's growth per edit, and the growth of each
counter. ``--check`` exits with status 1 when the edits drift (last ten over first ten beyond the
band, in CPU time, which a shared machine's waiting does not inflate), the resident memory grows
more than :data:`RSS_MIB_PER_EDIT` per edit over the second half of the edits, or any edit after
the warm-up compiles. Appended to bench/RESULTS.md under "## Steady speed" unless ``--no-record``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import resource
import shlex
import sys
import time

import numpy as np

from bench.full_release import rss_bytes
from bench.results import RESULTS, append_to_section

HEADING = "## Steady speed"
BAND = 0.10
MIB = 1024 ** 2
RSS_MIB_PER_EDIT = 1.0
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
_counts = {COMPILE_EVENT: 0, TRACE_EVENT: 0}


def _count_event(event: str, duration: float, **_):
    if event in _counts:
        _counts[event] += 1


def _install_counters():
    import jax

    if not getattr(_install_counters, "done", False):
        jax.monitoring.register_event_duration_secs_listener(_count_event)
        _install_counters.done = True


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def tiny_checkpoint() -> str:
    """The tiny fixture model in the release layout, converted into a temporary folder (removed at
    exit)."""
    import tempfile

    from editmgt_jax.convert.__main__ import main as convert_main
    from editmgt_jax.tools.tiny_release import make_release

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import atexit
    import shutil

    tmp = tempfile.mkdtemp(prefix="steady-tiny-")
    atexit.register(shutil.rmtree, tmp, True)
    make_release(os.path.join(root, "tests", "fixtures", "editmgt-tiny-v1"), os.path.join(tmp, "release"))
    if convert_main(["--official", os.path.join(tmp, "release"), "--out", os.path.join(tmp, "ckpt")]) != 0:
        raise SystemExit("error: converting the tiny fixture release failed")
    return os.path.join(tmp, "ckpt")


def editor_calls(steps: int, checkpoint: str | None = None, interleave: bool = False):
    """``(call(i), programs())``: one ``Editor.edit`` of the example image per call (seed ``i``).

    ``interleave``: after each edit, untimed, what the side-by-side harness (bench.vs_official) runs
    in our process between two edits: the compiled transformer forward on the CFG batch at the
    edit's size, then the 2048^3 matmul peak."""
    from editmgt_jax.editor import Editor

    editor = Editor.load(tiny_checkpoint() if checkpoint == "tiny" else checkpoint)
    image = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "shapes.png")
    between = None
    if interleave:
        import jax
        from PIL import Image

        from bench.peak import matmul_peak
        from bench.vs_official import our_forward_program

        with Image.open(image) as im:
            size = max(im.size) // 32 * 32
        fwd, fwd_args = our_forward_program(editor, size, 256)

        def between():
            jax.block_until_ready(fwd(*fwd_args))
            matmul_peak(2048, calls=5)

    def call(i):
        out = editor.edit(image, "paint the orange circle at the top cyan", seed=i, steps=steps).images
        if between is not None:
            c, t, n = _cpu_s(), time.perf_counter(), dict(_counts)
            between()
            call.between_s, call.between_cpu_s = time.perf_counter() - t, _cpu_s() - c
            call.between_counts = {k: _counts[k] - n[k] for k in _counts}
        return out

    return call, lambda: len(editor._programs)


def loop_calls(steps: int, ids: int = 16):
    """``(call(i), programs())``: the medium transformer's compiled sampling loop at ``ids`` x ``ids``
    image tokens."""
    from bench.accelerator_check import Plan, build_edit

    plan = Plan(transformer="medium", id_grid=(ids, ids), text_len=64, steps=steps, batches=(1,),
                attention_shapes=(), train_config="", train_steps=0, timed_calls=0)
    run, _, _ = build_edit(plan, "float32", 1)
    return (lambda i: run()), lambda: 1


FRESH_EVERY = 10


def fresh_edit_times(mode: str, steps: int, ids: int, checkpoint: str | None, calls: int = 2) -> dict:
    """The edit of ``mode`` in a new process, after its own warm-up call: the median CPU and wall
    seconds of ``calls`` timed calls (``{"cpu": .., "wall": ..}``)."""
    import json
    import subprocess

    code = ("import json\nfrom editmgt_jax import host_memory\nhost_memory.keep()\n"
            "from bench.steady import _fresh_edit_main\n"
            f"print(json.dumps(_fresh_edit_main({mode!r}, {steps}, {ids}, {checkpoint!r}, {calls})))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"the fresh process's edit failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fresh_edit_main(mode: str, steps: int, ids: int, checkpoint: str | None, calls: int) -> dict:
    import jax

    call, _ = editor_calls(steps, checkpoint) if mode == "editor" else loop_calls(steps, ids)
    jax.block_until_ready(call(10 ** 6))
    cpus, walls = [], []
    for i in range(calls):
        c, t = _cpu_s(), time.perf_counter()
        jax.block_until_ready(call(i))
        walls.append(time.perf_counter() - t)
        cpus.append(_cpu_s() - c)
    return {"cpu": float(np.median(cpus)), "wall": float(np.median(walls))}


def measure(mode: str, edits: int, steps: int, log=print, checkpoint: str | None = None,
            interleave: bool = False, ids: int = 16, control: bool = False, control_n: int = 2048,
            fresh: bool = False) -> dict:
    import jax

    from bench.peak import matmul_peak

    _install_counters()
    call, programs = editor_calls(steps, checkpoint, interleave) if mode == "editor" else loop_calls(steps, ids)
    if control:
        matmul_peak(control_n, calls=1)   # compiled before the warm-up edit, so no timed edit sees it
    t = time.perf_counter()
    jax.block_until_ready(call(edits))   # the warm-up: a seed none of the timed edits uses
    first_s = time.perf_counter() - t
    rows = []
    fresh_rows = []   # (index of the edit it preceded, fresh process's CPU s, wall s)
    for i in range(edits):
        if fresh and i % FRESH_EVERY == 0:
            f = fresh_edit_times(mode, steps, ids, checkpoint)
            fresh_rows.append((i, f["cpu"], f["wall"]))
        n0, tr0 = _counts[COMPILE_EVENT], _counts[TRACE_EVENT]
        c0, t0 = _cpu_s(), time.perf_counter()
        jax.block_until_ready(call(i))
        wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
        compiles, traces = _counts[COMPILE_EVENT] - n0, _counts[TRACE_EVENT] - tr0
        if interleave:   # the edit alone: the work in between is neither timed nor counted
            wall, cpu = wall - call.between_s, cpu - call.between_cpu_s
            compiles -= call.between_counts[COMPILE_EVENT]
            traces -= call.between_counts[TRACE_EVENT]
        rows.append(dict(wall=wall, cpu=cpu, rss=rss_bytes() / MIB, live=len(jax.live_arrays()),
                         programs=programs(), gc=len(gc.get_objects()),
                         compiles=compiles, traces=traces))
        if control:   # after the edit's counters are read: neither timed nor counted as the edit's
            rows[-1]["control_gflops"] = matmul_peak(control_n, calls=5) / 1e9
        if i % 10 == 9:
            log(f"[{mode}] {i + 1}/{edits}: {wall:.3f} s"
                + (f", matmul {rows[-1]['control_gflops']:.0f} GFLOP/s" if control else ""))
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
    out["checkpoint"] = checkpoint or "default"
    if fresh:
        # block by block: the median CPU time of the long-lived process's edits from one fresh sample
        # to the next, over the fresh process's
        blocks = []
        for i, f_cpu, f_wall in fresh_rows:
            ours = float(np.median([r["cpu"] for r in rows[i:i + FRESH_EVERY]]))
            blocks.append(dict(start=i, ours_cpu=ours, fresh_cpu=f_cpu, fresh_wall=f_wall, ratio=ours / f_cpu))
        out["fresh_blocks"] = blocks
    if mode == "loop":
        out["checkpoint"] = f"medium, {ids}x{ids} ids"
    if control:
        g = [r["control_gflops"] for r in rows]
        out["control_n"] = control_n
        out["control_median_gflops"] = float(np.median(g))
        # the machine's speed, last ten over first ten: below 1 when the machine got slower
        out["control_last10_vs_first10"] = float(np.median(g[-10:]) / np.median(g[:10]))
    out["compiles"] = int(sum(r["compiles"] for r in rows))
    out["traces"] = int(sum(r["traces"] for r in rows))
    # resident memory's growth per edit: the slope of a least-squares line over the second half of
    # the edits (a leak grows steadily; the allocator settles in the first few edits: 200 edits of the
    # medium loop grew 885 -> 910 MiB over the first ten, then not at all)
    half = edits // 2
    out["rss_mib_per_edit"] = float(np.polyfit(np.arange(half, edits), [r["rss"] for r in rows[half:]], 1)[0])
    # on a shared machine: the edits that took long without using more CPU waited for a core
    out["outside_with_normal_cpu"] = int(sum(
        1 for r in rows if abs(r["wall"] / med - 1) > BAND and abs(r["cpu"] / out["cpu_median_s"] - 1) <= BAND))
    return out


def verdict(r: dict) -> list[str]:
    """What fails ``--check``: drift in CPU time, resident memory growth, compiles after the warm-up."""
    bad = []
    if abs(r["cpu_last10_vs_first10"] - 1) > BAND:
        bad.append(f"CPU time per edit drifted: last 10 / first 10 = {r['cpu_last10_vs_first10']:.3f}")
    if r["rss_mib_per_edit"] > RSS_MIB_PER_EDIT:
        bad.append(f"resident memory grows {r['rss_mib_per_edit']:.2f} MiB per edit")
    if r["compiles"]:
        bad.append(f"{r['compiles']} XLA compilation(s) after the warm-up")
    return bad


def results_text(reports: list[dict], command: str) -> str:
    lines = [f"### {datetime.date.today().isoformat()}: `{command}`", "",
             f"Host {platform.node() or '?'}, {os.cpu_count()} CPUs, load average at the end "
             f"{os.getloadavg()[0]:.1f}.", "",
             "| mode | model | edits | steps | first call s | median s | min / max vs median | outside +-10% "
             "| of those with normal CPU time | last 10 / first 10 | CPU s per edit | CPU last 10 / first 10 | RSS MiB first -> last "
             "| RSS MiB per edit | live arrays | programs | compiles / traces after warm-up | gc objects |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        med = r["median_s"]
        lines.append(
            f"| {r['mode']} | {r['checkpoint']} | {r['edits']} | {r['steps']} | {r['first_s']:.2f} | {med:.3f} | "
            f"{r['min_s'] / med:.2f} / {r['max_s'] / med:.2f} | {r['outside']} | {r['outside_with_normal_cpu']} | "
            f"{r['last10_s'] / r['first10_s']:.3f} | {r['cpu_median_s']:.3f} | {r['cpu_last10_vs_first10']:.3f} | {r['rss_first']:.0f} -> {r['rss_last']:.0f} | "
            f"{r['rss_mib_per_edit']:+.3f} | {r['live_first']} -> {r['live_last']} | {r['programs_first']} -> {r['programs_last']} | "
            f"{r['compiles']} / {r['traces']} | "
            f"{r['gc_first']} -> {r['gc_last']} |")
        walls = ", ".join(f"{x['wall']:.2f}" for x in r["rows"])
        cpus = ", ".join(f"{x['cpu']:.2f}" for x in r["rows"])
        rss = ", ".join(f"{x['rss']:.0f}" for x in r["rows"])
        lines += ["", f"{r['mode']} per-edit wall seconds: {walls}", "", f"{r['mode']} per-edit CPU seconds: {cpus}",
                  "", f"{r['mode']} resident MiB after each edit: {rss}"]
        if r.get("fresh_blocks"):
            lines += ["", f"{r['mode']}, the same edit in a fresh process before every {FRESH_EVERY}th edit "
                      "(CPU s per edit: this process's median over the block / the fresh process's):", "",
                      "| edits | this process CPU s | fresh process CPU s | this / fresh |", "|---|---|---|---|"]
            lines += [f"| {b['start'] + 1}-{min(b['start'] + FRESH_EVERY, r['edits'])} | {b['ours_cpu']:.2f} | "
                      f"{b['fresh_cpu']:.2f} | {b['ratio']:.3f} |" for b in r["fresh_blocks"]]
        if "control_median_gflops" in r:
            g = ", ".join(f"{x['control_gflops']:.0f}" for x in r["rows"])
            n = r["control_n"]
            lines += ["", f"{r['mode']} control, the machine's {n}^3 float32 matmul after each edit (GFLOP/s): {g}",
                      "", f"{r['mode']} control: median {r['control_median_gflops']:.0f} GFLOP/s, last 10 / first 10 "
                      f"{r['control_last10_vs_first10']:.3f} (the edit's CPU time: "
                      f"{r['cpu_last10_vs_first10']:.3f})"]
        bad = verdict(r)
        lines += ["", f"{r['mode']} check: " + ("; ".join(bad) if bad else
                  f"steady (CPU time last 10 / first 10 within +-{BAND:.0%}, resident memory under "
                  f"{RSS_MIB_PER_EDIT} MiB per edit, no compilation after the warm-up)")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from editmgt_jax import host_memory

    host_memory.keep()   # as infer.edit and infer.app run (EDITMGT_KEEP_HOST_MEMORY=off: not)
    p = argparse.ArgumentParser(prog="python -m bench.steady", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("editor", "loop", "both"), default="both")
    p.add_argument("--edits", type=int, default=50)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--checkpoint", default=None,
                   help="editor mode: a model folder (default: the shipped model); 'tiny': the tiny fixture model")
    p.add_argument("--interleave", action="store_true",
                   help="editor mode: between edits, untimed, the forward program and matmul peak the "
                        "side-by-side harness runs in the same process")
    p.add_argument("--ids", type=int, default=16,
                   help="loop mode: image tokens per side (16: 256 px, 32: 512 px, 64: 1024 px)")
    p.add_argument("--control", action="store_true",
                   help="after each edit, untimed, the machine's matmul speed: tells a slower machine "
                        "from a slower process")
    p.add_argument("--fresh", action="store_true",
                   help=f"before every {FRESH_EVERY}th edit, the same edit in a new process: tells a slower "
                        "machine from a slower process")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when the edits drift, resident memory grows or an edit compiles")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    if args.edits < 10:
        print(f"error: --edits {args.edits}: at least 10 (first and last ten are compared)", file=sys.stderr)
        return 2
    if args.steps < 1:
        print(f"error: --steps {args.steps}: must be >= 1", file=sys.stderr)
        return 2
    if args.ids < 2 or args.ids % 2:
        print(f"error: --ids {args.ids}: must be an even number >= 2 (the transformer pools 2x2 tokens)",
              file=sys.stderr)
        return 2
    if args.checkpoint not in (None, "tiny") and not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        print(f"error: --checkpoint {args.checkpoint}: no config.json there (a model folder, or 'tiny')",
              file=sys.stderr)
        return 2

    modes = ("editor", "loop") if args.mode == "both" else (args.mode,)
    reports = [measure(m, args.edits, args.steps, log=lambda s: print(s, file=sys.stderr, flush=True),
                       checkpoint=args.checkpoint, interleave=args.interleave, ids=args.ids,
                       control=args.control, fresh=args.fresh)
               for m in modes]
    command = "python -m bench.steady " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = results_text(reports, command.strip())
    print(text)
    if not args.no_record:
        append_to_section(HEADING, text, path=RESULTS)
    if args.check and any(verdict(r) for r in reports):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
