"""One prepared check for an accelerator: run it once when a device is lent, read the tables.

    python -m bench.accelerator_check [--budget-s 450] [--no-record] [--results PATH]
    python -m bench.accelerator_check --cpu-smoke [--results PATH]     # tiny config, any host

Sections, in this order (each one timed; one that fails is a row saying how, and the rest go on;
a section that would start after ``--budget-s`` seconds is listed as skipped):

  device     backend, device kind, compute capability, jax version, and the attention chooser's
             pick (``editmgt_jax.models.attention.choose``) for the released model's attention
             call (head dim 128 with the reference bias) in bf16 and float32, and for the medium
             config's (head dim 64);
  attention  every implementation (xla, naive, cudnn, cudnn-bf16, pallas) at the released head dim
             and a 64-wide head, in the dtypes it is meant for, against the full-logits formula
             in float32 (``highest`` precision): max error of the output and of the q/k/v
             gradients, seconds per forward + backward, and whether the chooser's declared
             constraints agree with what ran (a kernel the chooser accepts must run; one it rejects
             is tried anyway, forced, and its error shown);
  edit       the released-size edit with random weights: 1024 px (64x64 ids, a 32x32 transformer
             grid), 256 text tokens, 36 steps, CFG 6, consolidation over the single-stream blocks,
             region hold at 0.3, random sampling, the whole loop as one program (bench.sampler's
             edit; the VQ and text encoders are not in it); bf16 and float32: compile seconds and
             seconds per edit (median of the timed calls after one warm-up);
  batch      the bf16 edit at batch 1, 4 and 8: seconds per call, edits per second, and throughput
             against batch 1;
  train      the medium config's train step (bench.train.run_one: 83.1M parameters, batch 4,
             32x32 ids): compile seconds, step seconds, MFU with FLOPs from XLA's cost analysis
             against a matmul peak measured in the same process.

Targets (from the project's issue list): a bf16 36-step 1024 px edit under 0.8 s; batch 8 at least
2x the throughput of batch 1. Tables are printed and appended to bench/RESULTS.md under
"## Accelerator check" (``--results`` elsewhere; ``--no-record`` nowhere). ``--cpu-smoke`` runs
every section at the tiny fixture config (8x8 ids, 2 steps, batches 1 and 2) in well under a
minute of compute, so the script is exercised by the test suite; it records only with
``--results``.

Compile times are real compiles: the persistent compilation cache is not turned on here.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback

import numpy as np

from bench.results import RESULTS, append_to_section

HEADING = "## Accelerator check"
TARGET_EDIT_S = 0.8
TARGET_BATCH8_SPEEDUP = 2.0


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one run of the check (the device plan or the CPU smoke plan)."""

    transformer: str                        # a bench.sampler config name, or "released"
    id_grid: tuple[int, int]
    text_len: int
    steps: int
    batches: tuple[int, ...]
    attention_shapes: tuple[tuple[int, int, int, int, int, int], ...]   # (B, H, text, image, ref, D)
    train_config: str
    train_steps: int
    timed_calls: int


DEVICE_PLAN = Plan(transformer="released", id_grid=(64, 64), text_len=256, steps=36, batches=(1, 4, 8),
                   attention_shapes=((2, 8, 256, 1024, 1024, 128), (2, 8, 256, 1024, 1024, 64)),
                   train_config="medium", train_steps=5, timed_calls=3)
SMOKE_PLAN = Plan(transformer="tiny", id_grid=(8, 8), text_len=8, steps=2, batches=(1, 2),
                  attention_shapes=((1, 2, 4, 16, 16, 16),), train_config="tiny", train_steps=1, timed_calls=1)
# (implementation, input dtype): each kernel in the dtypes it is meant for
CASES = (("xla", "float32"), ("xla", "bfloat16"), ("naive", "float32"), ("cudnn", "bfloat16"),
         ("cudnn-bf16", "float32"), ("pallas", "float32"), ("pallas", "bfloat16"))


# ----------------------------------------------------------------------------- helpers
def _median_call(fn, calls: int) -> float:
    import jax

    jax.block_until_ready(fn())   # warm-up
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _error_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:160]


def _table(header: list[str], rows: list[list]) -> str:
    def cell(x):
        if isinstance(x, float):
            return "nan" if math.isnan(x) else (f"{x:.3g}" if abs(x) < 1e-2 or abs(x) >= 1e4 else f"{x:.3f}")
        return str(x)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def _transformer_config(name: str):
    from bench.sampler import load_transformer_config
    from editmgt_jax.models.transformer import RELEASED_CONFIG, TransformerConfig

    return TransformerConfig.from_official(RELEASED_CONFIG) if name == "released" else load_transformer_config(name)


# ----------------------------------------------------------------------------- device + chooser
def section_device(plan: Plan) -> dict:
    import jax

    from editmgt_jax.models import attention as att

    backend, cc = att.device_facts()
    dev = jax.devices()[0]
    rows = []
    med = _transformer_config("medium")
    rel = _transformer_config("released")
    grid = (plan.id_grid[0] // 2) * (plan.id_grid[1] // 2)
    seq = plan.text_len + 2 * grid
    requested = os.environ.get(att.ENV_VAR) or None
    for label, cfg in (("released", rel), ("medium", med)):
        for dtype in ("bfloat16", "float32"):
            p = att.Problem(backend, dtype, cfg.attention_head_dim, seq, True, cc)
            c = att.choose(p, requested, report=False)
            rows.append([label, dtype, cfg.attention_head_dim, p.kernel_head_dim, seq, c.name, c.reason or "-"])
    info = dict(backend=backend, device=str(dev.device_kind), compute_capability=cc, devices=len(jax.devices()),
                jax=jax.__version__, requested=requested)
    return dict(info=info, rows=rows)


# ----------------------------------------------------------------------------- attention
def _attention_case(impl: str, dtype_name: str, shape, problem_backend, cc, calls: int) -> list:
    import jax
    import jax.numpy as jnp

    from editmgt_jax.models import attention as att

    b, h, lt, li, lr, d = shape
    seg = att.Segments(lt, li, lr)
    dtype = jnp.dtype(dtype_name)
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, w = (jax.random.normal(kk, (b, h, seg.total, d), jnp.float32) for kk in ks)
    ls = jnp.float32(math.log(1.1))
    problem = att.Problem(problem_backend, jnp.dtype(dtype).name, d, seg.total, True, cc)
    rejects = att.REQUIREMENTS[impl].rejects(problem)

    def loss_fn(implementation):
        def f(q, k, v):
            out, _ = att.attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), seg, ls,
                                   implementation=implementation)
            return jnp.sum(out.astype(jnp.float32) * w), out
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

    with jax.default_matmul_precision("highest"):
        (_, ref_out), ref_g = loss_fn("naive")(q, k, v)
        ref_g = [np.asarray(g, np.float64) for g in ref_g]
        ref_out = np.asarray(ref_out, np.float64)
    try:
        fn = loss_fn(impl)
        (_, out), grads = jax.block_until_ready(fn(q, k, v))
        sec = _median_call(lambda: fn(q, k, v), calls)
    except Exception as e:  # noqa: BLE001  (kernels fail with several error types)
        agree = "yes" if rejects else "NO: accepted but failed"
        return [impl, d, jnp.dtype(dtype).name, rejects or "fits", "fails: " + _error_line(e), "", "", "", agree]
    out_err = float(np.max(np.abs(np.asarray(out, np.float64) - ref_out)) / max(1.0, np.max(np.abs(ref_out))))
    g_err = max(float(np.max(np.abs(np.asarray(g, np.float64) - r)) / max(1.0, float(np.max(np.abs(r)))))
                for g, r in zip(grads, ref_g))
    agree = "yes" if not rejects else "NO: rejected but ran (constraint too strict?)"
    return [impl, d, jnp.dtype(dtype).name, rejects or "fits", "ran", out_err, g_err, sec, agree]


def section_attention(plan: Plan) -> dict:
    from editmgt_jax.models import attention as att

    backend, cc = att.device_facts()
    rows = []
    for shape in plan.attention_shapes:
        for impl, dtype_name in CASES:
            rows.append(_attention_case(impl, dtype_name, shape, backend, cc, plan.timed_calls))
    return dict(rows=rows, shapes=plan.attention_shapes)


# ----------------------------------------------------------------------------- edit + batch
def build_edit(plan: Plan, dtype_name: str, batch: int):
    """``(run, compile_s, flops)`` of the edit of ``plan`` at ``batch`` in ``dtype_name`` (random
    weights; bench.sampler's inputs and sampler settings)."""
    import jax.numpy as jnp
    from flax import nnx

    from bench.sampler import EditSpec, _flops, compiled_edit, random_state
    from editmgt_jax.models.transformer import EditTransformer

    dt = jnp.dtype(dtype_name)
    tr_cfg = _transformer_config(plan.transformer)
    spec = EditSpec(id_grid=plan.id_grid, text_len=plan.text_len, steps=plan.steps, batch=batch)
    graphdef, state = random_state(lambda: EditTransformer(tr_cfg, rngs=nnx.Rngs(0), dtype=dt, param_dtype=dt))
    compiled, args, compile_s = compiled_edit(graphdef, state, tr_cfg, spec)
    return (lambda: compiled(*args)), compile_s, _flops(compiled)


def section_edit(plan: Plan, dtype_name: str, batch: int = 1) -> list:
    run, compile_s, flops = build_edit(plan, dtype_name, batch)
    sec = _median_call(run, plan.timed_calls)
    return [dtype_name, batch, plan.steps, compile_s, sec, batch / sec,
            float("nan") if not flops else flops / sec / 1e12]


# ----------------------------------------------------------------------------- train
def section_train(plan: Plan) -> list:
    from bench.train import run_one

    r = run_one(plan.train_config, True, plan.train_steps)[-1]
    return [r["config"], r["batch"], r["params"], r["compile_s"], r["step_s"], r["step_tflop"],
            r["achieved_gflops"] / 1e3, r["peak_gflops"] / 1e3, r["mfu"]]


# ----------------------------------------------------------------------------- driver
def run_check(plan: Plan, budget_s: float, log=print) -> dict:
    """Every section of the check; returns the numbers and the markdown text."""
    t_start = time.perf_counter()
    res: dict = {"sections": {}, "skipped": [], "failed": {}}

    def go(name, fn):
        if time.perf_counter() - t_start > budget_s:
            res["skipped"].append(name)
            log(f"[{name}] skipped: past the {budget_s:.0f} s budget")
            return None
        t = time.perf_counter()
        log(f"[{name}] ...")
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001  (a failed section is a result too)
            res["failed"][name] = _error_line(e)
            log(f"[{name}] failed: {_error_line(e)}")
            traceback.print_exc(file=sys.stderr)
            return None
        log(f"[{name}] done in {time.perf_counter() - t:.1f} s")
        res["sections"][name] = out
        return out

    go("device", lambda: section_device(plan))
    go("attention", lambda: section_attention(plan))
    edits = []
    e = go("edit bf16", lambda: section_edit(plan, "bfloat16", plan.batches[0]))
    if e:
        edits.append(e)
    for b in plan.batches[1:]:
        e = go(f"batch {b}", lambda b=b: section_edit(plan, "bfloat16", b))
        if e:
            edits.append(e)
    go("train", lambda: section_train(plan))
    e = go("edit float32", lambda: section_edit(plan, "float32", plan.batches[0]))
    if e:
        edits.append(e)
    res["edits"] = edits
    res["total_s"] = time.perf_counter() - t_start
    return res


def results_text(plan: Plan, res: dict, command: str) -> str:
    s = res["sections"]
    dev = s.get("device", {}).get("info", {})
    out = [f"### {datetime.date.today().isoformat()}: `{command}`", "",
           f"Device: {dev.get('device', '?')} ({dev.get('backend', '?')}, compute capability "
           f"{dev.get('compute_capability')}, {dev.get('devices', '?')} device(s)), jax {dev.get('jax', '?')}, "
           f"host {platform.node() or '?'}; whole check {res['total_s']:.0f} s."]
    if "device" in s:
        out += ["", "Attention chooser (its pick for each model's attention call on this device; "
                f"EDITMGT_ATTENTION={dev.get('requested') or 'unset'}):", "",
                _table(["model", "dtype", "head dim", "kernel head dim", "tokens", "pick", "passed over"],
                       s["device"]["rows"])]
    if "attention" in s:
        out += ["", "Attention implementations against the full-logits formula in float32 (errors relative to "
                "max(1, max |ref|); gradients: worst of q, k, v; seconds per forward + backward):", "",
                _table(["impl", "head dim", "dtype", "chooser", "status", "out err", "grad err", "s/call",
                        "chooser agrees"], s["attention"]["rows"])]
    if res.get("edits"):
        b1 = {r[0]: r for r in res["edits"] if r[1] == plan.batches[0]}
        rows = []
        for r in res["edits"]:
            base = b1.get(r[0])
            rows.append(r + [r[5] / base[5] if base else float("nan")])
        out += ["", f"Edit, random weights, {plan.transformer} transformer, {plan.id_grid[0]}x{plan.id_grid[1]} ids, "
                f"{plan.text_len} text tokens, {plan.steps} steps, CFG, consolidation, hold (VQ and text encoders "
                "not included):", "",
                _table(["dtype", "batch", "steps", "compile s", "s/call", "edits/s", "TFLOP/s", "throughput vs batch 1"],
                       rows)]
        if plan is DEVICE_PLAN:
            bf = b1.get("bfloat16")
            b8 = [r for r in rows if r[0] == "bfloat16" and r[1] == 8]
            out += [""]
            if bf:
                out.append(f"- bf16 36-step edit: {bf[4]:.3f} s (target < {TARGET_EDIT_S} s: "
                           f"{'met' if bf[4] < TARGET_EDIT_S else 'missed'}).")
            if b8:
                out.append(f"- batch 8 throughput: {b8[0][-1]:.2f}x batch 1 (target >= {TARGET_BATCH8_SPEEDUP}: "
                           f"{'met' if b8[0][-1] >= TARGET_BATCH8_SPEEDUP else 'missed'}).")
    if "train" in s:
        out += ["", "Train step (bench.train.run_one; FLOPs from XLA's cost analysis; peak: a large matmul in the "
                "same process):", "",
                _table(["config", "batch", "params", "compile s", "step s", "TFLOP/step", "achieved TFLOP/s",
                        "peak TFLOP/s", "MFU"], [s["train"]])]
    for name, why in res["failed"].items():
        out.append(f"- section {name} failed: {why}")
    for name in res["skipped"]:
        out.append(f"- section {name} skipped (past the time budget)")
    return "\n".join(out) + "\n"


INTRO = """`python -m bench.accelerator_check`: the prepared device check (see its docstring). Until a device
is lent, only `--cpu-smoke` runs (in the test suite, tiny config, not recorded here)."""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.accelerator_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="every section at the tiny config (any host)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="sections that would start after this many seconds are skipped (default 450; "
                        "none with --cpu-smoke)")
    p.add_argument("--results", default=None, metavar="PATH",
                   help=f"markdown file to append the tables to (default {RESULTS}; with --cpu-smoke: none)")
    p.add_argument("--no-record", action="store_true", help="print only")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the raw numbers as JSON")
    args = p.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = math.inf if args.cpu_smoke else 450.0
    if args.budget_s <= 0:
        print(f"error: --budget-s {args.budget_s}: must be > 0", file=sys.stderr)
        return 2
    plan = SMOKE_PLAN if args.cpu_smoke else DEVICE_PLAN

    res = run_check(plan, args.budget_s, log=lambda m: print(m, file=sys.stderr, flush=True))
    command = "python -m bench.accelerator_check " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = results_text(plan, res, command.strip())
    print(text)
    path = args.results or (None if args.cpu_smoke else RESULTS)
    if path and not args.no_record:
        append_to_section(HEADING, text, intro=INTRO, path=path)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({k: v for k, v in res.items()}, fh, indent=1, default=str)
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
