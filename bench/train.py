"""Training-step benchmark: tokens/s and model-FLOPs utilisation against this machine's matmul peak.

    python -m bench.train [--configs default,tiny,medium] [--batches 8,32] [--steps 4] [--no-record]
    python -m bench.train --released [--max-batch 64]      # on a GPU: the 1024 px released model
    python -m bench.train --configs medium --attention naive,xla --donate-only   # attention before/after
    python -m bench.train --configs medium --donate-only --lora       # full fine-tuning vs LoRA r32/a128
    python -m bench.train --before-after 3 --steps 3                  # the default editor's step, before/after
    python -m bench.train --configs medium --donate-only --lora --steps 2 --rounds 4   # + alternating rounds
    python -m bench.train --configs medium --lora --state-only    # train-state bytes only, no compile

Per config, with and without donating the train state, each in a fresh process (so the peak host
memory, ``ru_maxrss``, belongs to that run alone):

* ``default``: the shipped default model's editor, ``configs/editor_synthetic_onestage.py`` (its
  transformer on the 2x2-pooled 8x8 grid, text encoder, region loss and batch size; 64 px -> 16x16
  ids); ``previous``: the 16x16-grid editor of the three-stage recipe (``configs/editor_synthetic_region.py``);
* ``--before-after ROUNDS``: the default editor's step before the throughput work (``previous``, with
  1x1 convolutions lowered as convolutions) and after (``default``), alternating in one process;
* ``tiny``: ``configs/editor_tiny.py`` (width 32, 1 dual + 1 single block, small text encoder),
  64 px -> 16x16 target ids, batch 16;
* ``medium``: the 83.1M-parameter transformer of ``bench/medium_transformer_config.json``
  (4 dual + 8 single blocks, width 512), 32x32 ids (16x16 transformer grid), 64 text tokens of a
  small text encoder, batch 4;
* ``--attention``: the attention implementations to compare (``EDITMGT_ATTENTION`` of each child;
  ``naive`` builds the full ``[B, H, S, S]`` logits, ``xla`` is the blocked default on CPU);
* ``--lora``: each config also with LoRA (``editor.lora``: rank 32, alpha 128, the official targets
  to_q/to_k/to_v; random base weights): only the adapters get gradients and optimizer state;
  the rows give the train state's parts and XLA's ``memory_analysis`` of the compiled step
  (arguments, outputs, temporaries);
* ``--rounds N`` (with ``--lora``): one more process holds both variants and times them in
  alternating rounds (full, LoRA, full, ...; ``--steps`` timed steps each), so that the speed
  ratio is measured under the same load (median step of each);
* ``--released``: the released 1024 px transformer (1.0B parameters, 64x64 ids), frozen-encoder
  text states (256 x 2304) given as inputs, bf16 compute, remat, at the largest batch that fits
  (doubling from 1). Meant for an accelerator.

The step is the real ``editmgt_jax.training.step`` train step (masking, condition dropout, text
encoder, transformer, AdamW with clipping) on random token batches, so data loading is not timed.
FLOPs per step come from XLA's ``cost_analysis`` of the compiled step (forward, backward and
optimizer); the peak is a large ``jnp.dot`` timed in the same process (``bench.peak``; float32 on
CPU, bfloat16 on GPU). MFU = achieved FLOP/s / peak. tokens/s counts target-token positions.

Results are printed and, unless ``--no-record``, appended to bench/RESULTS.md under "## Training".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time

from bench.peak import matmul_peak
from bench.results import append_to_section

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name: str):
    import ml_collections

    from configs import editor_tiny
    from editmgt_jax.models.transformer import RELEASED_CONFIG, TransformerConfig

    c = editor_tiny.get_config()
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    if name in ("default", "previous"):
        # default: the shipped default editor's recipe (configs/editor_synthetic_onestage.py: 8x8
        # transformer grid of 2x2-pooled cells, 2 heads of 32); previous: the three-stage recipe's
        # final stage (configs/editor_synthetic_region.py: the 16x16 grid, 4 heads of 16). Both with
        # the region loss, 64 px -> 16x16 ids, batch 16.
        from configs import editor_synthetic_onestage, editor_synthetic_region

        c = (editor_synthetic_onestage if name == "default" else editor_synthetic_region).get_config()
        c.init_from = ""
        c.editor.code_embedding_init = ""
        c.optim.schedule = "constant"
        c.optim.warmup_steps = 0
        c.editor.vq_checkpoint = ""
        return c, dict(batch=int(c.train.batch_size), grid=c.editor.image_size // 4,
                       text_len=int(c.editor.text.max_length))
    if name == "tiny":
        return c, dict(batch=16, grid=16, text_len=24)
    if name == "medium":
        with open(os.path.join(REPO, "bench", "medium_transformer_config.json")) as fh:
            t = TransformerConfig.from_official(json.load(fh))
        c.editor.transformer = ml_collections.ConfigDict(t.to_dict())
        c.editor.text = dict(kind="small", vocab_size=1024, max_length=64, width=256, num_layers=2,
                             num_heads=4)
        return c, dict(batch=4, grid=32, text_len=64)
    if name == "released":
        t = TransformerConfig.from_official(RELEASED_CONFIG)
        c.editor.transformer = ml_collections.ConfigDict(t.to_dict())
        c.editor.text = dict(kind="precomputed")
        c.precision.compute_dtype = "bfloat16"
        c.remat = True
        return c, dict(batch=1, grid=64, text_len=256)
    raise ValueError(f"unknown config {name!r}")


def _batch(config, shape, batch: int):
    import numpy as np

    rng = np.random.RandomState(0)
    t = config.editor.transformer
    g = shape["grid"]
    out = dict(source_ids=rng.randint(0, t.codebook_size, (batch, g, g)).astype(np.int32),
               target_ids=rng.randint(0, t.codebook_size, (batch, g, g)).astype(np.int32),
               index=np.arange(batch, dtype=np.int32))
    if config.editor.text.kind == "small":
        out["instruction_ids"] = rng.randint(0, config.editor.text.vocab_size,
                                             (batch, shape["text_len"])).astype(np.int32)
    else:
        out["text_states"] = rng.randn(batch, shape["text_len"], t.joint_attention_dim).astype(np.float32)
        out["pooled"] = rng.randn(batch, t.pooled_projection_dim).astype(np.float32)
    return out


def _prepare(name: str, donate: bool, batch: int | None, lora: bool) -> dict:
    """Build, initialise and compile one config's train step (full or LoRA) in this process."""
    import jax
    import numpy as np

    from editmgt_jax.parallel import make_mesh
    from editmgt_jax.training.state import TrainProgram
    from editmgt_jax.training.step import global_batch, loss_from_config, make_steps

    config, shape = _config(name)
    if lora:
        config.editor.lora.enabled = True
    mesh = make_mesh({"data": len(jax.devices())})
    program = TrainProgram.create(config, mesh, lora_needs_init_from=False)
    state, rest = program.init_state(0)
    aux = {"rest": rest, "frozen": {}}
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(program.model.abstract_params)))
    n_trained = n_params
    if lora:   # the model's size (FLOPs), not the adapters'
        n_params += int(sum(np.prod(x.shape) for x in jax.tree.leaves(program.model.abstract_rest)))
    batch = batch or shape["batch"]
    host = _batch(config, shape, batch)
    steps_fn = make_steps(program, loss_from_config(config), {}, host, aux, donate=donate)
    data = global_batch(host, mesh)
    t = time.perf_counter()
    compiled = steps_fn.train.lower(state, data, aux).compile()
    compile_s = time.perf_counter() - t
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]
    return dict(program=program, state=state, rest=rest, aux=aux, data=data, compiled=compiled,
                compile_s=compile_s, shape=shape, batch=batch, n_params=n_params, n_trained=n_trained,
                trained_leaves=len(paths), trained_non_adapter=sum("lora" not in p for p in paths))


def _mib(tree) -> float:
    import jax

    return sum(x.nbytes for x in jax.tree.leaves(tree)) / 2**20


def _memory_fields(p: dict) -> dict:
    """Sizes of the train state's parts and XLA's ``memory_analysis`` of the compiled step."""
    mem = p["compiled"].memory_analysis()
    state = p["state"]
    return dict(state_mib=_mib(state), trained_mib=_mib(state.params), opt_state_mib=_mib(state.opt_state),
                frozen_mib=_mib(p["rest"]), trained_leaves=p["trained_leaves"],
                trained_non_adapter=p["trained_non_adapter"],
                step_arg_mib=getattr(mem, "argument_size_in_bytes", 0) / 2**20,
                step_out_mib=getattr(mem, "output_size_in_bytes", 0) / 2**20,
                step_alias_mib=getattr(mem, "alias_size_in_bytes", 0) / 2**20,
                step_temp_mib=getattr(mem, "temp_size_in_bytes", 0) / 2**20)


def run_one(name: str, donate: bool, steps: int, batches: tuple[int, ...] | None = None,
            stop_on_oom: bool = False, lora: bool = False) -> list[dict]:
    """Compile and time the train step of one config in this process, for each batch size.

    Each batch size builds its own train state and compiles its own step.
    With ``stop_on_oom``, the first batch size that runs out of device memory ends the sweep.
    """
    import jax
    import jax.numpy as jnp

    on_gpu = jax.devices()[0].platform == "gpu"
    peak_args = (8192, jnp.bfloat16) if on_gpu else (2048, jnp.float32)
    rows = []
    for batch in batches or (None,):
        try:
            p = _prepare(name, donate, batch, lora)
            compiled, state, data, aux = p["compiled"], p["state"], p["data"], p["aux"]
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            flops = float(cost.get("flops", 0.0)) if cost else 0.0
            peak_before = matmul_peak(*peak_args)
            for _ in range(2):   # warm-up
                state, m = compiled(state, data, aux)
            jax.block_until_ready(m)
            t = time.perf_counter()
            for _ in range(steps):
                state, m = compiled(state, data, aux)
            loss = float(m["loss"])  # waits for the last step
            step_s = (time.perf_counter() - t) / steps
        except Exception as e:  # noqa: BLE001  (out of memory surfaces as several error types)
            oom = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
            if stop_on_oom and oom:
                print(f"batch {batch}: out of device memory, stopping the sweep", flush=True)
                break
            raise
        p["state"] = state
        # On a shared machine the achievable peak drifts: take the better of two measurements
        # bracketing the timed steps (MFU is then a lower bound).
        peak = max(peak_before, matmul_peak(*peak_args))
        batch, shape, n_params = p["batch"], p["shape"], p["n_params"]
        tokens = batch * shape["grid"] ** 2
        rows.append(dict(
            config=name, donate=donate, batch=batch, params=n_params, tokens_per_step=tokens,
            training=f"lora r{p['program'].lora.rank}" if lora else "full", trained_params=p["n_trained"],
            **_memory_fields(p),
            compile_s=p["compile_s"], step_s=step_s, tokens_per_s=tokens / step_s,
            examples_per_s=batch / step_s,
            step_tflop=flops / 1e12, achieved_gflops=flops / step_s / 1e9, peak_gflops=peak / 1e9,
            mfu=flops / step_s / peak if flops else float("nan"),
            analytic_6nt_tflop=6 * n_params * tokens / 1e12, loss=loss,
            peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            device=str(jax.devices()[0].device_kind), platform=jax.devices()[0].platform))
        print(json.dumps(rows[-1]), flush=True)
        del p, state, compiled
    return rows


def _alternate(variants: dict, steps: int, rounds: int) -> dict:
    """Time prepared train steps (``_prepare``) in alternating rounds, ``steps`` timed steps of each
    variant per round after two warm-up steps: ``{variant: [seconds per step, ...]}``."""
    import jax

    times = {v: [] for v in variants}
    for p in variants.values():   # warm-up
        for _ in range(2):
            p["state"], m = p["compiled"](p["state"], p["data"], p["aux"])
        jax.block_until_ready(m)
    for r in range(rounds):
        for v, p in variants.items():
            for _ in range(steps):
                t = time.perf_counter()
                p["state"], m = p["compiled"](p["state"], p["data"], p["aux"])
                jax.block_until_ready((p["state"], m))
                times[v].append(time.perf_counter() - t)
            print(f"round {r + 1}/{rounds} {v}: " + " ".join(f"{s:.2f}" for s in times[v][-steps:]) + " s",
                  file=sys.stderr, flush=True)
    return times


def run_alternating(name: str, donate: bool, steps: int, rounds: int, batch: int | None = None) -> dict:
    """Full fine-tuning and LoRA in one process, timed in alternating rounds (full, lora, full, ...;
    ``steps`` timed steps each), so that both see the same load: the median step of each and their
    ratio. Both states live in this process, so its peak RSS belongs to neither (see ``run_one``)."""
    import statistics

    variants = {"full": _prepare(name, donate, batch, False), "lora": _prepare(name, donate, batch, True)}
    times = _alternate(variants, steps, rounds)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    return dict(config=name, donate=donate, batch=variants["full"]["batch"], rounds=rounds,
                steps_per_round=steps, step_s_full=times["full"], step_s_lora=times["lora"],
                median_s_full=med["full"], median_s_lora=med["lora"],
                full_over_lora=med["full"] / med["lora"])


def state_sizes(name: str, lora: bool) -> dict:
    """The train state's parts for one config from its abstract state (shapes only: nothing is
    initialised or compiled), and whether every trained leaf is an adapter."""
    import jax
    import numpy as np

    from editmgt_jax.parallel import make_mesh
    from editmgt_jax.training.state import TrainProgram

    def mib(tree):
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)) / 2**20

    config, _ = _config(name)
    config.editor.lora.enabled = lora
    program = TrainProgram.create(config, make_mesh({"data": 1}), lora_needs_init_from=False)
    s = program.abstract_state
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(s.params)[0]]
    return dict(config=name, training=f"lora r{program.lora.rank}" if lora else "full",
                trained_params=int(sum(np.prod(a.shape) for a in jax.tree.leaves(s.params))),
                trained_leaves=len(paths), trained_non_adapter=sum("lora" not in q for q in paths),
                trained_mib=mib(s.params), opt_state_mib=mib(s.opt_state),
                opt_state_leaves=sum(1 for a in jax.tree.leaves(s.opt_state) if a.ndim),
                state_mib=mib(s), frozen_mib=mib(program.model.abstract_rest))


def run_released(max_batch: int, steps: int) -> list[dict]:
    """The released model at batch 1, 2, 4, ... up to the largest that fits (or ``max_batch``)."""
    batches = tuple(2 ** i for i in range(max_batch.bit_length()) if 2 ** i <= max_batch)
    rows = run_one("released", True, steps, batches, stop_on_oom=True)
    if not rows:
        raise RuntimeError("the released model does not fit at batch 1")
    return rows


def _child(name: str, donate: bool, steps: int, attention: str | None = None, batch: int | None = None,
           lora: bool = False, rounds: int = 0) -> dict:
    cmd = [sys.executable, "-m", "bench.train", "--_one", name, "--steps", str(steps)]
    if lora or rounds:
        cmd.append("--lora")
    if rounds:
        cmd += ["--rounds", str(rounds)]
    if not donate:
        cmd.append("--no-donate")
    if batch:
        cmd += ["--_batch", str(batch)]
    env = dict(os.environ)
    if attention:
        env["EDITMGT_ATTENTION"] = attention
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{name} (donate={donate}, attention={attention}) failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["attention"] = attention or "default"
    if rounds:
        sys.stderr.write(out.stderr[-2000:])
    return row


def _table(rows: list[dict]) -> str:
    if any(r.get("training", "full") != "full" for r in rows):
        return _lora_table(rows)
    head = ("| config | attention | params | batch | donate | examples/s | tokens/s | step (ms) | TFLOP/step | GFLOP/s | "
            "matmul peak GFLOP/s | MFU | compile (s) | peak RSS (MiB) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['config']} | {r.get('attention', 'default')} | {r['params'] / 1e6:.2f}M | {r['batch']} | {'yes' if r['donate'] else 'no'} "
             f"| {r.get('examples_per_s', r['batch'] / r['step_s']):.1f} | {r['tokens_per_s']:.0f} | {1e3 * r['step_s']:.1f} | {r['step_tflop']:.3f} "
             f"| {r['achieved_gflops']:.1f} | {r['peak_gflops']:.0f} | {100 * r['mfu']:.1f}% "
             f"| {r['compile_s']:.1f} | {r['peak_rss_mib']:.0f} |" for r in rows]
    return head + "\n".join(lines) + "\n"


def _lora_table(rows: list[dict]) -> str:
    """Full fine-tuning against LoRA: what is trained, the train state's size (params + optimizer
    state + step + RNG), the step's temporary buffers (XLA ``memory_analysis``), speed, peak RSS."""
    nan = float("nan")
    head = ("| config | training | params | trained | batch | donate | train state (MiB) | of it optimizer state (MiB) "
            "| frozen weights (MiB) | step arguments / outputs / temporaries (MiB) "
            "| step (ms) | tokens/s | TFLOP/step | compile (s) | peak RSS (MiB) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['config']} | {r.get('training', 'full')} | {r['params'] / 1e6:.2f}M "
             f"| {r.get('trained_params', r['params']) / 1e6:.3f}M | {r['batch']} | {'yes' if r['donate'] else 'no'} "
             f"| {r.get('state_mib', nan):.1f} | {r.get('opt_state_mib', nan):.1f} | {r.get('frozen_mib', 0.0):.1f} "
             f"| {r.get('step_arg_mib', nan):.1f} / {r.get('step_out_mib', nan):.1f} / {r.get('step_temp_mib', nan):.1f} "
             f"| {1e3 * r['step_s']:.1f} | {r['tokens_per_s']:.0f} | {r['step_tflop']:.3f} | {r['compile_s']:.1f} "
             f"| {r['peak_rss_mib']:.0f} |" for r in rows]
    return head + "\n".join(lines) + "\n"


def run_before_after(steps: int, rounds: int) -> dict:
    """The default editor's train step before and after the throughput work, in one process and in
    alternating rounds (before, after, before, ...): 'before' is the previous recipe's step
    (``previous``) with 1x1 convolutions lowered as convolutions (what ``layers.Conv2d`` did before
    it ran them as matmuls), 'after' the shipped recipe's step (``default``). Median step and
    examples/s of each and their ratio."""
    import statistics

    from editmgt_jax.models import layers

    pointwise = layers.Conv2d._pointwise
    layers.Conv2d._pointwise = lambda self: False       # trace 'before' with the convolution lowering
    try:
        before = _prepare("previous", True, None, False)
    finally:
        layers.Conv2d._pointwise = pointwise
    variants = {"before": before, "after": _prepare("default", True, None, False)}
    times = _alternate(variants, steps, rounds)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    batch = variants["after"]["batch"]
    return dict(batch=batch, rounds=rounds, steps_per_round=steps, step_s_before=times["before"],
                step_s_after=times["after"], median_s_before=med["before"], median_s_after=med["after"],
                examples_per_s_before=batch / med["before"], examples_per_s_after=batch / med["after"],
                speedup=med["before"] / med["after"],
                compile_s_before=variants["before"]["compile_s"], compile_s_after=variants["after"]["compile_s"],
                params_before=variants["before"]["n_params"], params_after=variants["after"]["n_params"])


def _before_after_text(r: dict, command: str) -> str:
    return (f"\n`{command}` ({datetime.date.today().isoformat()}; {os.cpu_count()} CPUs, 1-min load average "
            f"{os.getloadavg()[0]:.1f} at the end; Python {platform.python_version()})\n\n"
            "| step | params | batch | median step (ms) | examples/s | compile (s) |\n|---|---|---|---|---|---|\n"
            f"| before: previous recipe, 1x1 convolutions as convolutions | {r['params_before'] / 1e6:.2f}M | {r['batch']} "
            f"| {1e3 * r['median_s_before']:.0f} | {r['examples_per_s_before']:.1f} | {r['compile_s_before']:.1f} |\n"
            f"| after: shipped recipe (2x2-pooled grid, 1x1 as matmuls) | {r['params_after'] / 1e6:.2f}M | {r['batch']} "
            f"| {1e3 * r['median_s_after']:.0f} | {r['examples_per_s_after']:.1f} | {r['compile_s_after']:.1f} |\n"
            f"\nSpeed-up (median step before / after, {r['rounds']} alternating rounds of {r['steps_per_round']} "
            f"steps): {r['speedup']:.2f}x.\n")


def _alternating_text(alts: list[dict]) -> str:
    return "".join(
        f"\nAlternating rounds in one process ({a['config']}, batch {a['batch']}, {a['rounds']} rounds of "
        f"{a['steps_per_round']} timed steps per variant, full first): median step full "
        f"{1e3 * a['median_s_full']:.0f} ms, LoRA {1e3 * a['median_s_lora']:.0f} ms, "
        f"full / LoRA = {a['full_over_lora']:.2f} (steps (s): full "
        f"{', '.join(f'{t:.2f}' for t in a['step_s_full'])}; LoRA {', '.join(f'{t:.2f}' for t in a['step_s_lora'])}).\n"
        for a in alts)


def _record(rows: list[dict], command: str, extra: str = "") -> None:
    load = os.getloadavg()[0]
    dev = rows[0]["device"]
    text = (f"\n`{command}` ({datetime.date.today().isoformat()}; {rows[0]['platform']} device "
            f"{dev!r}, {os.cpu_count()} CPUs, 1-min load average {load:.1f} at the end; "
            f"Python {platform.python_version()})\n\n" + _table(rows) + extra)
    append_to_section("## Training", text, intro=_NOTES)


_NOTES = """The real train step (masking, condition dropout, text encoder, transformer, AdamW + clipping) on
random token batches; data loading is not timed. FLOPs per step from XLA's `cost_analysis` of the
compiled step (forward + backward + optimizer); peak = a 2048^3 float32 `jnp.dot` (CPU) or 8192^3
bfloat16 (GPU) timed in the same process (the better of two measurements bracketing the timed
steps); MFU = achieved / peak. tokens/s counts target-token
positions. Each row runs in its own process; peak RSS is that process's `ru_maxrss`."""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="tiny,medium")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--released", action="store_true", help="the 1024 px released model (accelerator)")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--attention", default=None,
                   help="comma-separated attention implementations to compare (default: the backend's)")
    p.add_argument("--batches", help="comma-separated batch sizes to time (default: each config's own)")
    p.add_argument("--donate-only", action="store_true", help="only the rows with a donated state")
    p.add_argument("--lora", action="store_true",
                   help="each config with full fine-tuning and with LoRA (editor.lora: rank 32, alpha 128)")
    p.add_argument("--before-after", type=int, default=0, metavar="ROUNDS",
                   help="the default editor's train step before (previous recipe, 1x1 convolutions as "
                        "convolutions) and after (shipped recipe), alternating ROUNDS rounds in one process")
    p.add_argument("--rounds", type=int, default=0,
                   help="with --lora: also time full and LoRA in one process, alternating ROUNDS rounds of "
                        "--steps timed steps each (median step of each and their ratio)")
    p.add_argument("--state-only", action="store_true",
                   help="with --lora: print the train state's parts (abstract shapes, no compile) and stop")
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--_batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--no-donate", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.state_only:
        for name in args.configs.split(","):
            for lora in ((False, True) if args.lora else (False,)):
                print(json.dumps(state_sizes(name, lora)), flush=True)
        return 0
    if args.before_after:
        r = run_before_after(args.steps, args.before_after)
        print(json.dumps(r))
        command = "python -m bench.train " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        text = _before_after_text(r, command.strip())
        print(text)
        if not args.no_record:
            append_to_section("## Training", text, intro=_NOTES)
        return 0
    if args.rounds and not args.lora:
        p.error("--rounds alternates full fine-tuning and LoRA: give --lora too")
    if args._one and args.rounds:
        print(json.dumps(run_alternating(args._one, not args.no_donate, args.steps, args.rounds, args._batch)))
        return 0
    if args._one:
        run_one(args._one, not args.no_donate, args.steps,
                (args._batch,) if args._batch else None, lora=args.lora)   # prints one JSON line
        return 0
    command = "python -m bench.train " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.released:
        rows = run_released(args.max_batch, args.steps)
    else:
        rows, alts = [], []
        sizes = [int(b) for b in args.batches.split(",")] if args.batches else [None]
        for name in args.configs.split(","):
            for attention in (args.attention.split(",") if args.attention else [None]):
                for batch in sizes:
                    for donate in ((True,) if args.donate_only else (True, False)):
                        for lora in ((False, True) if args.lora else (False,)):
                            r = _child(name, donate, args.steps, attention, batch, lora)
                            print(json.dumps(r), flush=True)
                            rows.append(r)
                        if args.rounds:
                            a = _child(name, donate, args.steps, attention, batch, rounds=args.rounds)
                            print(json.dumps(a), flush=True)
                            alts.append(a)
    extra = _alternating_text(alts)
    print(_table(rows) + extra)
    if not args.no_record:
        _record(rows, command.strip(), extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
