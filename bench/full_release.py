"""The released-size model on this machine: convert it, then edit at 1024 px on CPU.

    python -m bench.full_release all --workdir /work/main/workdirs/release/full [--dtype float32]
        [--convert-dtype bfloat16] [--edit-dtype bfloat16] [--steps 2] [--reuse-release] [--keep]
        [--no-record]

Stages (each its own process, so each peak RSS is that stage's own ``ru_maxrss``):

  write    random weights at the released configuration (``configs/editmgt_1024.py``: 14 dual +
           28 single blocks of width 1024, the VQ-GAN, a CLIP-H text tower and Gemma-2-2B), in the
           release's layout: ``editmgt/``, ``vqvae/``, ``text_encoder/``, ``llm_encoder/`` with
           ``config.json`` and sharded safetensors plus their ``*.safetensors.index.json`` (5 GB
           shards, as transformers / diffusers write them), tokenizer files (a CLIP-style BPE of
           the release's 49408 ids, a small Gemma-style BPE) and ``scheduler/scheduler_config.json``
           (``mask_token_id`` 8255). Official key names and shapes come from the converter's own rule
           tables read backwards, so every tensor the converter expects is there.
  convert  ``python -m editmgt_jax.convert --official RELEASE --out CKPT`` as a child process:
           wall time and the child's peak RSS, against the largest single component's size.
  edit     the converted checkpoint at 1024 px: CLIP + Gemma-2 encode the instruction and the
           negative prompt, are freed, then the VQ + transformer ``Editor`` program runs a
           ``--steps``-step edit twice (the first call compiles). Peak RSS of the text phase and of
           the edit phase are sampled from ``/proc/self/status``.

While a stage runs, the parent watches the machine's available memory and kills the stage if it
drops below ``--min-available-gb`` (default 2), so a shared machine never runs out. The big files
live under ``--workdir`` and are deleted at the end unless ``--keep``. Results are appended to
bench/RESULTS.md under "## Released-size model on CPU".
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

from bench.results import append_to_section

HEADING = "## Released-size model on CPU"
GIB = 1024 ** 3
SHARD_BYTES = 5 * 10 ** 9

# Official config.json contents of the text encoders the release ships (laion CLIP-ViT-H-14 text tower
# with projection; google/gemma-2-2b).
CLIP_H_CONFIG = {
    "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model", "vocab_size": 49408,
    "hidden_size": 1024, "intermediate_size": 4096, "projection_dim": 1024, "num_hidden_layers": 24,
    "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "torch_dtype": "float32",
}
GEMMA_2_2B_CONFIG = {
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": 256000, "hidden_size": 2304,
    "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
    "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
    "torch_dtype": "float32",
}
SCHEDULER_CONFIG = {"_class_name": "Scheduler", "_diffusers_version": "0.32.1", "mask_token_id": 8255,
                    "masking_schedule": "cosine"}
# release folder -> (component, weights file stem, official config)
FOLDERS = {
    "editmgt": ("transformer", "diffusion_pytorch_model", None),
    "vqvae": ("vq", "diffusion_pytorch_model", None),
    "text_encoder": ("clip", "model", CLIP_H_CONFIG),
    "llm_encoder": ("gemma", "model", GEMMA_2_2B_CONFIG),
}


# ----------------------------------------------------------------------------- memory watching
def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def available_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    """Samples this process's RSS every ``period`` seconds; ``phase(name)`` starts a new maximum."""

    def __init__(self, period: float = 0.2):
        self.period, self.peaks, self.current = period, {}, None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def phase(self, name: str) -> None:
        self.current = name
        self.peaks.setdefault(name, rss_bytes())

    def _run(self):
        while not self._stop.is_set():
            if self.current:
                self.peaks[self.current] = max(self.peaks[self.current], rss_bytes())
            time.sleep(self.period)

    def stop(self) -> dict:
        self._stop.set()
        self._t.join()
        return dict(self.peaks)


def run_watched(cmd: list[str], min_available: float, log) -> dict:
    """Run ``cmd``; kill it if the machine's available memory falls below ``min_available`` bytes.
    Returns wall time, exit code, the child's peak RSS (``ru_maxrss``) and the lowest available memory."""
    import resource

    log("$ " + " ".join(shlex.quote(c) for c in cmd))
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    lowest, killed = available_bytes(), False
    while proc.poll() is None:
        avail = available_bytes()
        lowest = min(lowest, avail)
        if avail < min_available:
            proc.kill()
            killed = True
            log(f"killed: available memory {avail / GIB:.2f} GiB < {min_available / GIB:.2f} GiB")
            proc.wait()
            break
        time.sleep(0.25)
    wall = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"rc": proc.returncode, "wall_s": wall, "peak_rss": peak if peak > before * 1024 else None,
            "lowest_available": lowest, "killed": killed}


# ----------------------------------------------------------------------------- official keys
def _fill_source(pattern: str, groups: dict[int, str]) -> str:
    """The official key a rule's ``source`` regex matches with its groups set to ``groups``."""
    out, i, depth, n, start = [], 0, 0, 0, None
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if depth == 0:
                out.append(pattern[i + 1])
            i += 2
            continue
        if c == "(":
            if depth == 0:
                n += 1
                start = n
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                out.append(groups[start])
        elif depth == 0:
            out.append(c)
        i += 1
    return "".join(out)


def _inverse_shape(transform_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if transform_name == "linear":
        return (shape[1], shape[0])
    if transform_name == "conv":            # ours [kh, kw, in, out] -> torch [out, in, kh, kw]
        return (shape[3], shape[2], shape[0], shape[1])
    if transform_name == "conv_transpose":  # ours [kh, kw, in, out] -> torch [in, out, kh, kw]
        return (shape[2], shape[3], shape[0], shape[1])
    return tuple(shape)


def official_tensors(component: str, official_config: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """``official key -> (shape, kind)`` for every tensor of ``component`` the converter maps, from
    its rule table read backwards (kind: ``norm``, ``norm_offset``, ``bias``, ``embedding``, ``weight``)."""
    from editmgt_jax.convert.core import TRANSFORMS, flatten_abstract
    from editmgt_jax.convert.registry import COMPONENTS, abstract_params, config_from_official

    comp = COMPONENTS[component]
    cfg = config_from_official(comp, official_config)
    names = {fn: name for name, fn in TRANSFORMS.items()}
    rules = [r for r in comp.rules(cfg) if r.target is not None]
    compiled = []
    for r in rules:
        # target template -> regex over our paths, with the rule's group numbers as names
        parts = re.split(r"\\(\d+)", r.target)
        rx = "".join(re.escape(p) if k % 2 == 0 else f"(?P<g{p}>[^/]+)" for k, p in enumerate(parts))
        compiled.append((re.compile(rx), r))
    out = {}
    for path, leaf in flatten_abstract(abstract_params(comp, cfg)).items():
        ours = "/".join(str(p) for p in path)
        for rx, r in compiled:
            m = rx.fullmatch(ours)
            if m is None:
                continue
            groups = {int(k[1:]): v for k, v in m.groupdict().items()}
            key = _fill_source(r.source, groups)
            if re.fullmatch(r.source, key) is None:
                continue
            leafname = ours.rsplit("/", 1)[-1]
            kind = {"scale": "norm", "bias": "bias", "embedding": "embedding"}.get(leafname, "weight")
            if kind == "norm" and component == "gemma":
                kind = "norm_offset"       # Gemma's RMSNorm multiplies by (1 + weight)
            out[key] = (_inverse_shape(names.get(r.transform, "identity"), tuple(leaf.shape)), kind)
            break
        else:
            raise RuntimeError(f"{component}: no rule produces our parameter {ours}")
    return out


def random_tensor(rng, shape, kind: str, dtype) -> np.ndarray:
    if kind == "norm":
        return np.ones(shape, dtype)
    if kind in ("bias", "norm_offset"):
        return np.zeros(shape, dtype)
    if kind == "embedding":
        std = 0.02
    else:  # fan-in scaled (torch [out, in, ...]: every axis but the first)
        std = 1.0 / np.sqrt(max(1, int(np.prod(shape[1:]))))
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= np.float32(std)
    return x.astype(dtype, copy=False)


def write_component(folder: str, stem: str, tensors: dict, dtype, seed: int, log) -> int:
    """Sharded safetensors + index, as transformers / diffusers save large models. Returns bytes."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    itemsize = np.dtype(dtype).itemsize
    shards, cur, size = [], [], 0
    for key, (shape, _) in tensors.items():
        n = int(np.prod(shape)) * itemsize
        if cur and size + n > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append(key)
        size += n
    shards.append(cur)
    weight_map, total = {}, 0
    for i, keys in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = {k: random_tensor(rng, tensors[k][0], tensors[k][1], dtype) for k in keys}
        save_file(arrays, os.path.join(folder, name), metadata={"format": "pt"})
        nbytes = sum(a.nbytes for a in arrays.values())
        total += nbytes
        weight_map.update({k: name for k in keys})
        del arrays
        gc.collect()
        log(f"  {os.path.basename(folder)}/{name}: {len(keys)} tensors, {nbytes / GIB:.2f} GiB")
    with open(os.path.join(folder, f"{stem}.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    return total


def stage_write(release: str, dtype_name: str, log) -> dict:
    import ml_dtypes

    from editmgt_jax.models import transformer, vq
    from editmgt_jax.tools.tiny_release import write_scheduler_config, write_tokenizers

    dtype = ml_dtypes.bfloat16 if dtype_name == "bfloat16" else np.float32
    configs = {"editmgt": dict(transformer.RELEASED_CONFIG), "vqvae": dict(vq.RELEASED_CONFIG),
               "text_encoder": dict(CLIP_H_CONFIG, torch_dtype=dtype_name),
               "llm_encoder": dict(GEMMA_2_2B_CONFIG, torch_dtype=dtype_name)}
    sizes = {}
    for seed, (folder, (component, stem, _)) in enumerate(FOLDERS.items()):
        d = os.path.join(release, folder)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as fh:
            json.dump(configs[folder], fh, indent=2)
        tensors = official_tensors(component, configs[folder])
        sizes[folder] = write_component(d, stem, tensors, dtype, seed, log)
    write_tokenizers(release, CLIP_H_CONFIG["vocab_size"], 4096)
    write_scheduler_config(release, SCHEDULER_CONFIG)
    return sizes


# ----------------------------------------------------------------------------- edit
def stage_edit(ckpt: str, steps: int, log, dtype_name: str = "float32") -> dict:
    import jax
    import jax.numpy as jnp

    from editmgt_jax import checkpoints
    from editmgt_jax.checkpoints import load_module, release_tokenizer
    from editmgt_jax.editor import Editor
    from editmgt_jax.text_side import ReleaseTextSide

    peaks = PeakSampler()
    out = {"dtype": dtype_name}
    dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
    doc = checkpoints.read_config(ckpt)
    comps = doc["components"]
    conv = checkpoints.read_conventions(doc)
    prompt = "make the sky pink"

    peaks.phase("text")
    t0 = time.time()
    clip = load_module(ckpt, "clip", comps["clip"], dtype=dtype)
    gemma = load_module(ckpt, "gemma", comps["gemma"], dtype=dtype)
    out["text_load_s"] = time.time() - t0
    t0 = time.time()
    text = ReleaseTextSide(clip, gemma, release_tokenizer(ckpt))
    enc = text.encode([prompt])
    neg = text.encode([conv.negative_prompt], allow_empty=True)
    out["text_encode_s"] = time.time() - t0
    del clip, gemma, text
    gc.collect()
    jax.clear_caches()
    out["rss_after_text_freed"] = rss_bytes()

    class Precomputed:
        """The instruction's and the negative prompt's encodings, computed above."""

        def encode(self, prompts, allow_empty=False):
            return neg if allow_empty else enc

    peaks.phase("edit")
    t0 = time.time()
    modules = {name: load_module(ckpt, name, comps[name], dtype=dtype) for name in ("vq", "transformer")}
    editor = Editor(doc, modules, Precomputed(), path=ckpt)
    del modules
    out["edit_load_s"] = time.time() - t0
    rng = np.random.default_rng(0)
    image = (rng.random((1024, 1024, 3)) * 255).astype(np.uint8)
    for run in ("first", "second"):
        t0 = time.time()
        res = editor.edit([image], [prompt], size=1024, steps=steps, seed=0)
        out[f"edit_{run}_s"] = time.time() - t0
        log(f"edit ({run} call): {out[f'edit_{run}_s']:.1f}s")
        if out["edit_first_s"] > 300:   # a slow machine: the compiled-only time is not worth the wait
            break
    out["tokens_shape"] = list(res.tokens.shape)
    out["tokens_finite"] = bool(np.all(res.tokens < editor.vq_cfg.num_vq_embeddings))
    out["mask_token_id"] = editor.sampler_config().mask_token_id
    out["guidance_scale"] = editor.sampler_config().guidance_scale
    out["peaks"] = peaks.stop()
    out["jax"] = jax.__version__
    return out


# ----------------------------------------------------------------------------- driver
def _gib(x) -> str:
    return "n/a" if x is None else f"{x / GIB:.2f}"


def component_bytes(ckpt: str) -> dict[str, int]:
    """Parameter bytes per component of a converted checkpoint (from the stored arrays' metadata)."""
    from editmgt_jax.convert.core import flatten_abstract
    from editmgt_jax.convert.registry import COMPONENTS, abstract_params
    from editmgt_jax import checkpoints

    doc = checkpoints.read_config(ckpt)
    out = {}
    for name, cfg_dict in doc["components"].items():
        config_cls, _ = COMPONENTS[name].classes()
        cfg = config_cls.from_dict(cfg_dict)
        leaves = flatten_abstract(abstract_params(COMPONENTS[name], cfg)).values()
        out[name] = int(sum(np.prod(a.shape) for a in leaves))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.full_release", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["all", "write", "convert", "edit"])
    p.add_argument("--workdir", required=True, help="folder for the release and the checkpoint (big)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the written release weights")
    p.add_argument("--convert-dtype", default=None, choices=["float32", "bfloat16"],
                   help="dtype of the converted checkpoint (default: --dtype)")
    p.add_argument("--edit-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="Editor.load dtype of the 1024 px edit")
    p.add_argument("--reuse-release", action="store_true",
                   help="use the release already written under --workdir (skip the write stage)")
    p.add_argument("--steps", type=int, default=2, help="decoding steps of the 1024 px edit")
    p.add_argument("--min-available-gb", type=float, default=2.0)
    p.add_argument("--keep", action="store_true", help="keep the release and checkpoint folders")
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--json", default=None, help="(internal) where a stage writes its numbers")
    args = p.parse_args(argv)
    release = os.path.join(args.workdir, "release")
    ckpt = os.path.join(args.workdir, "ckpt")

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def dump(obj):
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(obj, fh, indent=2, default=str)

    if args.stage == "write":
        dump(stage_write(release, args.dtype, log))
        return 0
    if args.stage == "edit":
        dump(stage_edit(ckpt, args.steps, log, args.edit_dtype))
        return 0
    if args.stage == "convert":
        raise SystemExit("run 'all' (the convert stage is timed by the driver)")

    os.makedirs(args.workdir, exist_ok=True)
    min_avail = args.min_available_gb * GIB
    convert_dtype = args.convert_dtype or args.dtype
    nums: dict = {"avail_start": available_bytes(), "dtype": args.dtype, "convert_dtype": convert_dtype,
                  "edit_dtype": args.edit_dtype, "steps": args.steps}
    me = [sys.executable, "-m", "bench.full_release"]
    common = ["--workdir", args.workdir, "--dtype", args.dtype, "--steps", str(args.steps),
              "--edit-dtype", args.edit_dtype]
    try:
        jw = os.path.join(args.workdir, "write.json")
        if args.reuse_release and os.path.isfile(jw):
            r = {"rc": 0, "wall_s": None, "reused": True}
        else:
            r = run_watched(me + ["write", "--json", jw] + common, min_avail, log)
        if r["rc"] != 0:
            raise RuntimeError(f"write stage failed ({r})")
        nums["write"] = {**r, "sizes": json.load(open(jw))}
        log(f"write: {r['wall_s']}s, sizes (GiB) "
            + ", ".join(f"{k} {v / GIB:.2f}" for k, v in nums["write"]["sizes"].items()))

        if os.path.exists(ckpt):
            shutil.rmtree(ckpt)
        r = run_watched([sys.executable, "-m", "editmgt_jax.convert", "--official", release, "--out", ckpt,
                         "--dtype", convert_dtype], min_avail, log)
        nums["convert"] = r
        if r["rc"] != 0:
            raise RuntimeError(f"convert failed ({r})")
        counts = component_bytes(ckpt)
        itemsize = 2 if convert_dtype == "bfloat16" else 4
        nums["component_bytes"] = {k: v * itemsize for k, v in counts.items()}
        nums["component_params"] = counts
        largest = max(nums["component_bytes"].items(), key=lambda kv: kv[1])
        nums["largest"] = largest
        nums["convert_ratio"] = r["peak_rss"] / largest[1]
        src_largest = max(nums["write"]["sizes"].values())
        nums["convert_ratio_source"] = r["peak_rss"] / src_largest
        log(f"convert: {r['wall_s']:.0f}s, peak RSS {_gib(r['peak_rss'])} GiB = "
            f"{nums['convert_ratio']:.2f}x the largest component ({largest[0]}, {_gib(largest[1])} GiB)")

        je = os.path.join(args.workdir, "edit.json")
        r = run_watched(me + ["edit", "--json", je] + common, min_avail, log)
        nums["edit"] = r
        if r["rc"] == 0:
            nums["edit"].update(json.load(open(je)))
        log(f"edit: rc {r['rc']}, peak RSS {_gib(r['peak_rss'])} GiB, {r['wall_s']:.0f}s")
    finally:
        with open(os.path.join(args.workdir, "numbers.json"), "w") as fh:
            json.dump(nums, fh, indent=2, default=str)
        if not args.keep:
            for d in (release, ckpt, jw):
                if os.path.isfile(d):
                    os.remove(d)
                else:
                    shutil.rmtree(d, ignore_errors=True)
            log("deleted the release and checkpoint folders")
    if not args.no_record and "edit" in nums:
        record(nums, argv if argv is not None else sys.argv[1:])
    return 0 if nums.get("edit", {}).get("rc") == 0 else 1


def record(n: dict, argv) -> None:
    e, c, w = n["edit"], n["convert"], n["write"]
    peaks = e.get("peaks", {})
    load = os.getloadavg()[0]
    cmd = "python -m bench.full_release " + " ".join(shlex.quote(a) for a in argv)
    folder = {comp: f for f, (comp, _, _) in FOLDERS.items()}
    rows = "\n".join(f"| {k} | {n['component_params'][k] / 1e6:,.1f}M | {_gib(w['sizes'].get(folder[k]))} | {_gib(v)} |"
                     for k, v in n["component_bytes"].items())
    compiled = (f", **{e['edit_second_s']:.0f} s** compiled" if "edit_second_s" in e
                else " (one call: the compiled-only time was not measured)")
    w_s = "reused from an earlier write stage" if w.get("wall_s") is None else f"{w['wall_s']:.0f} s"
    text = f"""`{cmd}` ({datetime.date.today()}; {platform.machine()}, {os.cpu_count()} CPUs shared, 1-min load
average {load:.1f} at the end; {_gib(n['avail_start'])} GiB available at the start; release weights
{n['dtype']}, converted to {n['convert_dtype']}, edit in {n['edit_dtype']})

| component | parameters | release files (GiB, {n['dtype']}) | converted (GiB, {n['convert_dtype']}) |
|---|---|---|---|
{rows}

- write (random weights, release layout: sharded safetensors + index): {w_s}
- convert (`python -m editmgt_jax.convert --dtype {n['convert_dtype']}`): **{c['wall_s']:.0f} s**, peak RSS
  **{_gib(c['peak_rss'])} GiB = {n['convert_ratio']:.2f}x** the largest converted component ({n['largest'][0]},
  {_gib(n['largest'][1])} GiB; {n['convert_ratio_source']:.2f}x its release files); target < 1.5x
- {n['steps']}-step 1024 px edit ({n['edit_dtype']}), guidance {e.get('guidance_scale')} (model batch 2), mask id
  {e.get('mask_token_id')}: text encoders load {e.get('text_load_s', 0):.0f} s + encode {e.get('text_encode_s', 0):.0f} s
  (peak RSS {_gib(peaks.get('text'))} GiB), freed; VQ + transformer load {e.get('edit_load_s', 0):.0f} s; edit
  **{e.get('edit_first_s', 0):.0f} s** with compilation{compiled} (peak RSS of the edit phase
  {_gib(peaks.get('edit'))} GiB); process peak RSS **{_gib(e.get('peak_rss'))} GiB**, lowest available
  memory on the machine during the edit {_gib(e.get('lowest_available'))} GiB
"""
    intro = ("Random weights at the released configuration, written in the release's layout, converted\n"
             "with the converter CLI and edited at 1024 px on CPU (the point is that it fits, not its speed).\n"
             "No accelerator was available for these runs, so there is no GPU/TPU number here.")
    append_to_section(HEADING, text, intro=intro)


if __name__ == "__main__":
    sys.exit(main())
