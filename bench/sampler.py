"""Sampler benchmark: the compiled edit loop against a Python loop over a jitted step, in one run.

    python -m bench.sampler [--config tiny|medium|both] [--steps 12] [--repeats 3] [--no-record]

Per config (the tiny fixture transformer, or the 83.1M-parameter medium config of
/work/shared/PERFORMANCE.md, copied to bench/medium_transformer_config.json), with random weights and
random source token ids (the VQ is not in the loop), the edit of PERFORMANCE.md: one 1024 px source
(64x64 ids, 32x32 transformer grid), 256 text tokens, CFG 6 (model batch 2), reference strength 1.1,
consolidation over all single-stream blocks, lambda 0.3, seeded stochastic sampling. It measures

  (a) ``loop``:    ``jax.jit`` of ``sampling.region_hold.sample`` (one ``lax.scan``), parameters as
                   jit arguments (graphdef / state split); time per edit and compile time;
  (b) ``pyloop``:  a Python loop over one jitted step (model call + CFG combine + consolidation +
                   ``step_update``, the body of (a)), same inputs and keys; time per edit, compile time;
  (c) ``forward``: the transformer alone on the CFG batch (with the attention capture), per call;
                   the non-transformer share of a step is ``1 - forward / (loop / steps)``;
      ``post``:    the step without the transformer (CFG combine + consolidation + ``step_update`` on
                   given logits and scores), per call: a direct cross-check of that share;
  (d) ``matmul``:  a 4096^3 float32 ``jnp.dot`` (``bench.peak``), the matmul peak; the forward's achieved
                   GFLOP/s (FLOPs from XLA's ``cost_analysis``) as a fraction of it;
  (e) ``vq``:      encode + decode of one image with the tiny fixture-style VQ (channels 8, random
                   weights), timed apart: PERFORMANCE.md's official 81.5 s edit included such a VQ,
                   so the comparison with it uses loop + vq.

All variants are timed in interleaved rounds (the order rotates every round) after one warm-up call,
and medians over the rounds are reported, so load drift on a shared machine cancels in the ratios.
A table is printed and, unless ``--no-record``, appended with the command, date and machine to
bench/RESULTS.md under "## Sampler".
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
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.peak import matmul_call
from bench.results import RESULTS, append_to_section

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HEADING = "## Sampler"
CONFIGS = {
    "tiny": os.path.join(ROOT, "tests", "fixtures", "editmgt-tiny-v1", "transformer_config.json"),
    "medium": os.path.join(HERE, "medium_transformer_config.json"),
}
VQ_CONFIG = os.path.join(ROOT, "tests", "fixtures", "editmgt-tiny-v1", "vqvae_config.json")
OFFICIAL_MEDIUM_EDIT_S = 81.5  # PERFORMANCE.md: official PyTorch pipeline, medium config, median of 3
REFERENCE_XLA_PEAK_GFLOPS = 440.0  # PERFORMANCE.md: XLA fp32 matmul "about 410 to 470" on that machine
MATMUL_N = 4096
VARIANTS = ("loop", "pyloop", "forward", "post", "matmul", "vq")


@dataclasses.dataclass(frozen=True)
class EditSpec:
    """The benchmarked edit (PERFORMANCE.md), independent of the transformer size."""

    id_grid: tuple[int, int] = (64, 64)   # 1024 px source through a 16x VQ
    text_len: int = 256
    steps: int = 12
    guidance_scale: float = 6.0
    reference_strength: float = 1.1
    hold_threshold: float = 0.3
    batch: int = 1


def load_transformer_config(name: str):
    from editmgt_jax.models.transformer import TransformerConfig

    with open(CONFIGS[name]) as fh:
        return TransformerConfig.from_official(json.load(fh))


def random_state(module_fn: Callable[[], Any], seed: int = 0):
    """``(graphdef, state)`` of ``module_fn()``, built abstractly and filled from numpy.

    Kernels and embeddings ~ N(0, 0.02^2) (VQ kernels ~ N(0, 1/fan_in) when ``fan_in`` scaling is on),
    norm scales ~ 1 + N(0, 0.02^2), biases ~ N(0, 0.02^2): random but numerically tame.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(nnx.eval_shape(module_fn))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        x = rng.standard_normal(leaf.shape, dtype=np.float32)
        if name == "scale":
            return jnp.asarray(1.0 + 0.02 * x, leaf.dtype)
        if name == "kernel" and len(leaf.shape) == 4:  # conv (VQ and transformer): keep activations O(1)
            return jnp.asarray(x / np.sqrt(np.prod(leaf.shape[:-1])), leaf.dtype)
        return jnp.asarray(0.02 * x, leaf.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, state.to_pure_dict()))
    return graphdef, state


def sampler_config(tr_cfg, spec: EditSpec):
    """The ``SamplerSettings`` of ``spec`` (consolidation over the single-stream blocks)."""
    from editmgt_jax.sampling.config import SamplerSettings

    singles = tuple(range(tr_cfg.num_layers, tr_cfg.num_blocks))
    return SamplerSettings(steps=spec.steps, guidance_scale=spec.guidance_scale,
                         reference_strength=spec.reference_strength, hold_threshold=spec.hold_threshold,
                         consolidation_blocks=singles, mask_token_id=tr_cfg.mask_token_id)


def make_inputs(tr_cfg, spec: EditSpec, seed: int = 0) -> dict[str, Any]:
    """Random source ids and prompt encodings for ``spec.batch`` edits, on device."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed + 1)
    b, (h, w), l = spec.batch, spec.id_grid, spec.text_len

    def f32(*shape):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))

    return dict(ref_ids=jnp.asarray(rng.integers(0, tr_cfg.codebook_size, (b, h, w)), jnp.int32),
                text=f32(b, l, tr_cfg.joint_attention_dim), pooled=f32(b, tr_cfg.pooled_projection_dim),
                neg_text=f32(b, l, tr_cfg.joint_attention_dim), neg_pooled=f32(b, tr_cfg.pooled_projection_dim),
                micro=jnp.tile(jnp.asarray([[1024.0, 1024.0, 0.0, 0.0, 6.0]], jnp.float32), (b, 1)),
                key=jax.random.key(seed))


def _compile(fn, *args) -> tuple[Any, float]:
    """AOT-compile ``jax.jit(fn)`` for ``args``; returns ``(compiled, seconds to lower + compile)``."""
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001  (not every backend implements it)
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    f = None if not ca else ca.get("flops")
    return float(f) if f and f > 0 else None


def compiled_edit(graphdef, state, tr_cfg, spec: EditSpec, seed: int = 0,
                  inputs: dict[str, Any] | None = None) -> tuple[Any, tuple, float]:
    """``(compiled, args, compile_s)``: the whole edit as one compiled program (``region_hold.sample``
    with :func:`sampler_config`'s settings) on ``inputs`` (default :func:`make_inputs`' for ``seed``);
    ``compiled(*args)`` returns ``(tokens, heatmap)``."""
    from flax import nnx

    from editmgt_jax.sampling.region_hold import sample

    cfg, knobs = sampler_config(tr_cfg, spec).split()
    x = inputs if inputs is not None else make_inputs(tr_cfg, spec, seed)

    def edit(st, ref_ids, text, pooled, neg_text, neg_pooled, micro, key):
        out = sample(nnx.merge(graphdef, st), cfg, knobs, ref_ids, text, pooled, neg_text, neg_pooled,
                     key=key, micro_conds=micro)
        return out["tokens"], out["heatmap"]

    args = (state, x["ref_ids"], x["text"], x["pooled"], x["neg_text"], x["neg_pooled"], x["micro"], x["key"])
    compiled, compile_s = _compile(edit, *args)
    return compiled, args, compile_s


def analytic_forward_flops(tr_cfg, spec: EditSpec, n_params: int) -> float:
    """Rough count for the CFG batch: ``2 x params x tokens + attention`` (QK^T and AV of every block)."""
    gh, gw = spec.id_grid[0] // 2, spec.id_grid[1] // 2
    tokens = spec.text_len + 2 * gh * gw  # text, image, reference
    attention = tr_cfg.num_blocks * 4 * tokens * tokens * tr_cfg.inner_dim
    return 2.0 * spec.batch * (2 * n_params * tokens + attention)


def build(name: str, spec: EditSpec, seed: int = 0, matmul_n: int = MATMUL_N) -> dict[str, Any]:
    """Model, inputs and every compiled program of one config; compile times in ``out['compile_s']``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from editmgt_jax.models.layers import param_count
    from editmgt_jax.models.transformer import EditTransformer
    from editmgt_jax.models.vq import VQConfig, VQModel
    from editmgt_jax.sampling.consolidation import consolidate
    from editmgt_jax.sampling.step import hold_mask, step_update

    tr_cfg = load_transformer_config(name)
    graphdef, state = random_state(lambda: EditTransformer(tr_cfg, rngs=nnx.Rngs(0)), seed)
    scfg = sampler_config(tr_cfg, spec)
    _, knobs = scfg.split()
    x = make_inputs(tr_cfg, spec, seed)
    b, (h, w) = spec.batch, spec.id_grid
    mask_id = scfg.mask_token_id
    model_kw = dict(reference_strength=scfg.reference_strength, capture_blocks=scfg.consolidation_blocks,
                    capture_mode=scfg.capture_mode)

    # (a) the whole edit as one program: compiled_edit
    # (b) the same body, one step per call; the CFG-batch inputs are built once, outside the loop
    def post(tokens, heat, i, keys, logits, scores, ref_ids):
        """Everything of a step after the transformer (as in ``sample``'s body)."""
        logits = logits.astype(jnp.float32)
        uncond, cond = logits[:b], logits[b:]
        logits = uncond + jnp.float32(scfg.guidance_scale) * (cond - uncond)
        cons = consolidate(scores.astype(jnp.float32)[b:], (h // 2, w // 2), (h, w))
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
        hold = hold_mask((tokens == mask_id).reshape(b, -1), cons["upsampled"], scfg.hold_threshold)
        tokens, _ = step_update(tokens, ref_ids, logits, hold, i, steps=scfg.steps, mask_id=mask_id,
                                temperature=jnp.asarray(knobs.temperatures)[i],
                                freeze_held=scfg.freeze_held, start_ratio=jnp.ones((b,), jnp.float32),
                                keys=step_keys)
        return tokens, heat + cons["smoothed"]

    def forward(st, ids, m_ref, m_text, m_pooled, m_micro, timestep):
        return nnx.merge(graphdef, st)(ids, m_ref, m_text, m_pooled, m_micro, timestep, **model_kw)

    def step(st, tokens, heat, i, keys, m_ref, m_text, m_pooled, m_micro, ref_ids):
        ids = jnp.concatenate([tokens, tokens], axis=0)
        timestep = jnp.full((2 * b,), scfg.steps - 1 - i, jnp.int32)
        logits, scores = forward(st, ids, m_ref, m_text, m_pooled, m_micro, timestep)
        return post(tokens, heat, i, keys, logits, scores, ref_ids)

    m_ref = jnp.concatenate([x["ref_ids"]] * 2)
    m_text = jnp.concatenate([x["neg_text"], x["text"]])
    m_pooled = jnp.concatenate([x["neg_pooled"], x["pooled"]])
    m_micro = jnp.concatenate([x["micro"]] * 2)
    keys = jax.random.split(x["key"], b)  # what ``sample`` does with one key
    tokens0 = jnp.full((b, h, w), mask_id, jnp.int32)
    heat0 = jnp.zeros((b, (h // 2) * (w // 2)), jnp.float32)
    i0 = np.int32(0)

    compile_s = {}
    c_edit, edit_args, compile_s["loop"] = compiled_edit(graphdef, state, tr_cfg, spec, inputs=x)
    c_step, compile_s["pyloop"] = _compile(step, state, tokens0, heat0, i0, keys, m_ref, m_text, m_pooled,
                                           m_micro, x["ref_ids"])
    ids_fwd = jnp.concatenate([tokens0, tokens0])
    t_fwd = jnp.full((2 * b,), scfg.steps - 1, jnp.int32)
    c_fwd, compile_s["forward"] = _compile(forward, state, ids_fwd, m_ref, m_text, m_pooled, m_micro, t_fwd)
    logits, scores = c_fwd(state, ids_fwd, m_ref, m_text, m_pooled, m_micro, t_fwd)
    c_post, compile_s["post"] = _compile(post, tokens0, heat0, i0, keys, logits, scores, x["ref_ids"])

    run_matmul, matmul_flops = matmul_call(matmul_n)

    with open(VQ_CONFIG) as fh:
        vq_cfg = VQConfig.from_official(json.load(fh))
    vq_graphdef, vq_state = random_state(lambda: VQModel(vq_cfg, rngs=nnx.Rngs(0)), seed + 2)
    f = vq_cfg.downsample_factor
    pixels = jax.random.uniform(jax.random.key(3), (b, h * f, w * f, 3), jnp.float32)

    def vq_round_trip(st, px):
        vq = nnx.merge(vq_graphdef, st)
        return vq.decode_ids(vq.encode_ids(px))

    c_vq, compile_s["vq"] = _compile(vq_round_trip, vq_state, pixels)

    def run_loop():
        return c_edit(*edit_args)

    def run_pyloop():
        tokens, heat = tokens0, heat0
        for i in range(spec.steps):
            tokens, heat = c_step(state, tokens, heat, np.int32(i), keys, m_ref, m_text, m_pooled, m_micro,
                                  x["ref_ids"])
        return tokens, heat / jnp.float32(spec.steps)

    runs = dict(
        loop=run_loop,
        pyloop=run_pyloop,
        forward=lambda: c_fwd(state, ids_fwd, m_ref, m_text, m_pooled, m_micro, t_fwd),
        post=lambda: c_post(tokens0, heat0, i0, keys, logits, scores, x["ref_ids"]),
        matmul=run_matmul,
        vq=lambda: c_vq(vq_state, pixels),
    )
    n_params = param_count(state)
    return dict(name=name, spec=spec, tr_cfg=tr_cfg, runs=runs, compile_s=compile_s, n_params=n_params,
                mask_id=mask_id, forward_flops=_flops(c_fwd), post_flops=_flops(c_post),
                forward_flops_analytic=analytic_forward_flops(tr_cfg, spec, n_params),
                matmul_n=matmul_n, matmul_flops=matmul_flops)


def _call(fn) -> tuple[float, Any]:
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - t0, out


def measure(built: dict[str, Any], repeats: int, *, min_round_s: float = 1.0, edit_warmup_limit_s: float = 60.0,
            variants: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
    """Times every variant in ``repeats`` interleaved rounds, after one warm-up call each.

    A round runs each variant ``n`` times back to back (``n`` from the warm-up so a round lasts about
    ``min_round_s``, at most 50); variant order rotates every round. The two whole-edit variants are
    warmed up only when ``steps x`` the forward's warm-up time is under ``edit_warmup_limit_s``
    (otherwise one call per round; their first round then includes the first call's costs, small
    next to minutes of compute). Returns per-variant medians of the per-call times (``times``),
    every round's value (``rounds``), the calls per round (``calls``), which variants were warmed up
    and the last output of each variant.
    """
    runs, steps = built["runs"], built["spec"].steps
    warm, outs = {}, {}
    fast = [v for v in variants if v not in ("loop", "pyloop")]
    for v in fast:
        warm[v], outs[v] = _call(runs[v])
    est_edit = steps * warm.get("forward", 0.0)
    for v in variants:
        if v not in warm and est_edit < edit_warmup_limit_s:
            warm[v], outs[v] = _call(runs[v])
    calls = {v: max(1, min(50, math.ceil(min_round_s / max(warm[v], 1e-6)))) if v in warm else 1 for v in variants}
    rounds: dict[str, list[float]] = {v: [] for v in variants}
    order = list(variants)
    for r in range(repeats):
        k = r % len(order)
        for v in order[k:] + order[:k]:
            t0 = time.perf_counter()
            for _ in range(calls[v]):
                _, outs[v] = _call(runs[v])
            rounds[v].append((time.perf_counter() - t0) / calls[v])
    times = {v: statistics.median(rounds[v]) for v in variants}
    return dict(times=times, rounds=rounds, calls=calls, warmed=sorted(warm), outputs=outs)


def report(built: dict[str, Any], meas: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one config (seconds, GFLOP/s, fractions)."""
    t, spec = meas["times"], built["spec"]
    # (b)/(a) per round (the two ran next to each other), so slow load drift cancels pairwise
    paired = [b / a for a, b in zip(meas["rounds"]["loop"], meas["rounds"]["pyloop"])]
    step_s = t["loop"] / spec.steps
    fwd_flops = built["forward_flops"] or built["forward_flops_analytic"]
    peak = built["matmul_flops"] / t["matmul"] / 1e9
    fwd_gflops = fwd_flops / t["forward"] / 1e9
    tok_a = np.asarray(meas["outputs"]["loop"][0])
    tok_b = np.asarray(meas["outputs"]["pyloop"][0])
    rep = dict(
        config=built["name"], params=built["n_params"], steps=spec.steps, id_grid=spec.id_grid,
        text_len=spec.text_len, repeats=len(meas["rounds"]["loop"]),
        loop_s=t["loop"], pyloop_s=t["pyloop"], ratio_pyloop_over_loop=statistics.median(paired),
        ratio_min=min(paired), ratio_max=max(paired), edits_warmed="loop" in meas["warmed"],
        compile_loop_s=built["compile_s"]["loop"], compile_pyloop_step_s=built["compile_s"]["pyloop"],
        compile_forward_s=built["compile_s"]["forward"],
        forward_s=t["forward"], step_s=step_s, non_transformer_share=1.0 - t["forward"] / step_s,
        share_rounds=[1.0 - f / (a / spec.steps) for a, f in zip(meas["rounds"]["loop"], meas["rounds"]["forward"])],
        post_s=t["post"], post_share=t["post"] / (t["forward"] + t["post"]),
        forward_gflop=fwd_flops / 1e9, forward_gflop_source="cost_analysis" if built["forward_flops"] else "analytic",
        forward_gflop_analytic=built["forward_flops_analytic"] / 1e9,
        forward_gflops=fwd_gflops, matmul_peak_gflops=peak, forward_frac_peak=fwd_gflops / peak,
        vq_s=t["vq"], edit_with_vq_s=t["loop"] + t["vq"],
        matmul_n=built["matmul_n"], tokens_equal_frac=float(np.mean(tok_a == tok_b)),
        loop_has_mask=bool(np.any(tok_a == built["mask_id"])),
    )
    if built["name"] == "medium":
        rep["official_over_ours"] = OFFICIAL_MEDIUM_EDIT_S / rep["edit_with_vq_s"]
        # Our time scaled to the matmul peak the official figures came with: a rough load correction.
        scaled = rep["edit_with_vq_s"] * peak / REFERENCE_XLA_PEAK_GFLOPS
        rep["official_over_ours_peak_scaled"] = OFFICIAL_MEDIUM_EDIT_S / scaled
    return rep


def format_table(reports: list[dict[str, Any]]) -> str:
    rows = [
        ("parameters", lambda r: f"{r['params'] / 1e6:.2f}M"),
        ("steps x timed rounds", lambda r: f"{r['steps']} x {r['repeats']}"),
        ("(a) compiled loop, s / edit", lambda r: f"{r['loop_s']:.3f}"),
        ("(b) Python loop over jitted step, s / edit", lambda r: f"{r['pyloop_s']:.3f}"),
        ("ratio (b) / (a), median of rounds (min - max)",
         lambda r: f"{r['ratio_pyloop_over_loop']:.3f} ({r['ratio_min']:.3f} - {r['ratio_max']:.3f})"),
        ("compile (a) loop, s", lambda r: f"{r['compile_loop_s']:.1f}"),
        ("compile (b) step, s", lambda r: f"{r['compile_pyloop_step_s']:.1f}"),
        ("compile forward, s", lambda r: f"{r['compile_forward_s']:.1f}"),
        ("(c) forward on the CFG batch, s", lambda r: f"{r['forward_s']:.4f}"),
        ("compiled-loop step, s", lambda r: f"{r['step_s']:.4f}"),
        ("non-transformer share, 1 - forward / step", lambda r: f"{100 * r['non_transformer_share']:.1f}%"),
        ("step without the transformer, s", lambda r: f"{r['post_s']:.4f}"),
        ("its share, post / (forward + post)", lambda r: f"{100 * r['post_share']:.1f}%"),
        ("forward GFLOP (XLA cost_analysis)", lambda r: f"{r['forward_gflop']:.1f}"),
        ("forward GFLOP, naive 2 x params x tokens + attention (an overcount)", lambda r: f"{r['forward_gflop_analytic']:.1f}"),
        ("forward GFLOP/s", lambda r: f"{r['forward_gflops']:.1f}"),
        ("(d) fp32 matmul peak (N^3 jnp.dot, N = %d), GFLOP/s" % reports[0]["matmul_n"], lambda r: f"{r['matmul_peak_gflops']:.1f}"),
        ("forward / matmul peak", lambda r: f"{100 * r['forward_frac_peak']:.1f}%"),
        ("(e) tiny VQ encode + decode, s", lambda r: f"{r['vq_s']:.3f}"),
        ("edit incl. VQ, (a) + (e), s", lambda r: f"{r['edit_with_vq_s']:.3f}"),
        ("official 81.5 s / ours (other run, see below)",
         lambda r: f"{r['official_over_ours']:.2f}x" if "official_over_ours" in r else "-"),
        ("same, our time scaled by matmul peak / 440 GFLOP/s",
         lambda r: f"{r['official_over_ours_peak_scaled']:.2f}x" if "official_over_ours" in r else "-"),
        ("tokens (a) == (b)", lambda r: f"{100 * r['tokens_equal_frac']:.2f}%"),
    ]
    head = "| | " + " | ".join(r["config"] for r in reports) + " |"
    sep = "|---|" + "---|" * len(reports)
    body = ["| " + label + " | " + " | ".join(fmt(r) for r in reports) + " |" for label, fmt in rows]
    return "\n".join([head, sep] + body)


def _targets(reports: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in reports:
        ok = r["ratio_pyloop_over_loop"] > 1.0
        lines.append(f"- {r['config']}: compiled loop faster than the Python loop: "
                     f"{'met' if ok else 'MISSED'} (ratio {r['ratio_pyloop_over_loop']:.3f}).")
        if r["config"] == "medium":
            share = r["non_transformer_share"]
            lines.append(f"- medium: non-transformer share of a step under 10%: "
                         f"{'met' if share < 0.10 else 'MISSED'} (1 - forward / step = {100 * share:.1f}%, per "
                         f"round {', '.join(f'{100 * x:.1f}%' for x in r['share_rounds'])}; measured directly, "
                         f"the step without the transformer: {100 * r['post_share']:.1f}%). PERFORMANCE.md's "
                         f"stricter 3%: {'met' if max(share, r['post_share']) < 0.03 else 'missed'}.")
            peak_ok = r["forward_frac_peak"] >= 0.70
            lines.append(f"- medium: forward at {100 * r['forward_frac_peak']:.0f}% of this run's matmul peak "
                         f"(PERFORMANCE.md target 70%: {'met' if peak_ok else 'missed'}). Official 81.5 s / our "
                         f"edit incl. VQ: {r['official_over_ours']:.2f} raw, about "
                         f"{r['official_over_ours_peak_scaled']:.2f} scaled to the reference machine's matmul "
                         f"peak (target 2.5: {'met' if r['official_over_ours_peak_scaled'] >= 2.5 else 'missed'}).")
    return lines


def results_text(reports: list[dict[str, Any]], command: str, load: tuple[tuple, tuple]) -> str:
    import jax

    date = datetime.date.today().isoformat()
    machine = (f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), shared; 1/5/15-min load average "
               f"{'/'.join(f'{v:.1f}' for v in load[0])} at the start, {'/'.join(f'{v:.1f}' for v in load[1])} "
               f"at the end; jax {jax.__version__}, backend {jax.default_backend()} "
               f"({jax.devices()[0].device_kind}), Python {platform.python_version()}")
    spec = reports[0]
    h, w = spec["id_grid"]
    cold = [r["config"] for r in reports if not r["edits_warmed"]]
    lines = [
        f"`{command}` ({date}; {machine})",
        "",
        f"Edit: batch 1, {h}x{w} random source ids ({h // 2}x{w // 2} transformer grid, no VQ in the loop), "
        f"{spec['text_len']} text tokens, "
        f"{spec['steps']} steps, CFG 6 (model batch 2), reference strength 1.1, consolidation over all "
        f"single-stream blocks, lambda 0.3, seeded sampling, random weights. Times are medians of "
        f"{spec['repeats']} interleaved rounds (rotating order: compiled loop, Python loop, forward, "
        f"step without the transformer, matmul, VQ) after one warm-up call of each"
        + (f" (except the whole edits of {', '.join(cold)}: too long to warm up, one call per round)" if cold else "")
        + "; the ratio (b)/(a) is the median of the per-round ratios.",
        "",
        format_table(reports),
        "",
        "Targets (issue 3 item 5; PERFORMANCE.md):",
        *_targets(reports),
    ]
    if any("official_over_ours" in r for r in reports):
        lines += ["", "The official pipeline's 81.5 s (median of 3; tiny VQ included) was measured by others on a "
                      "machine of this kind (2 cores, CPU), not in this run; the ratio uses this run's "
                      "compiled loop plus its tiny-VQ round trip. PERFORMANCE.md gives XLA about 410-470 GFLOP/s "
                      "for an fp32 matmul on that machine; when this run's matmul peak is far below that (other "
                      "jobs on the same cores), the raw ratio mostly measures the load, and the scaled row "
                      "(our time x this run's peak / 440) is the rough like-for-like estimate."]
    if any(r["non_transformer_share"] < 0 for r in reports):
        lines += ["", "A negative non-transformer share means a compiled-loop step took less time than the "
                      "standalone forward: inside the loop XLA hoists step-invariant work out of the loop body "
                      "(the text stream and conditioning; at tiny 6 of the 79 matmuls of the compiled edit sit "
                      "outside the while body) and the loop's working buffers are allocated once per edit, not "
                      "once per call (a fori_loop of bare forwards ran 0.90x the standalone forward's time per "
                      "step at tiny in a side experiment). The standalone forward then overstates the "
                      "transformer's part of a loop step, and the direct measurement (the step without the "
                      "transformer, timed on its own) is the better estimate of the non-transformer share."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sampler", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=("tiny", "medium", "both"), default="both")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds per variant")
    p.add_argument("--min-round-s", type=float, default=1.0, help="repeat fast variants to fill a round")
    p.add_argument("--edit-warmup-limit-s", type=float, default=60.0,
                   help="warm the whole-edit variants up only if steps x forward is shorter than this")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = p.parse_args(argv)
    command = "python -m bench.sampler " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    load0 = os.getloadavg()
    names = ("tiny", "medium") if args.config == "both" else (args.config,)
    reports = []
    for name in names:
        spec = EditSpec(steps=args.steps)
        t0 = time.perf_counter()
        built = build(name, spec)
        print(f"[{name}] built and compiled in {time.perf_counter() - t0:.1f} s", flush=True)
        meas = measure(built, args.repeats, min_round_s=args.min_round_s,
                       edit_warmup_limit_s=args.edit_warmup_limit_s)
        reports.append(report(built, meas))
        print(f"[{name}] rounds: " + json.dumps({v: [round(x, 4) for x in xs] for v, xs in meas["rounds"].items()}),
              flush=True)
        del built
    text = results_text(reports, command.strip(), (load0, os.getloadavg()))
    print("\n" + text)
    if not args.no_record:
        append_to_section(HEADING, text)
        print(f"\nappended to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
