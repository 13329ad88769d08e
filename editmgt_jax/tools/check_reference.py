"""Numerical parity against a reference-fixture folder made by running the official code.

  python -m editmgt_jax.tools.check_reference tests/fixtures/editmgt-tiny-v1
  python -m editmgt_jax.tools.check_reference tests/fixtures/editmgt-tiny-v2 --checkpoint CKPT

The folder holds ``<component>_config.json`` + ``<component>.safetensors`` for each component it
covers (``transformer``, ``vqvae``, ``clip_text``, ``gemma2``), a ``cases.npz`` of inputs and
outputs, and the images the cases name (see its MANIFEST.md). Every component found is converted
through the same converter as a release; every case whose arrays are present is run:

  a  transformer forwards: with reference tokens at strength 1 and at strength ``a_reference_strength_b``,
     and without reference tokens
  b  VQ encode (latents), ids, decode from ids
  c  CLIP pooled embeddings and Gemma-2 hidden states
  d  the whole deterministic edit (greedy sampling, region hold, consolidation), step by step

The mask id and the other conventions are read as the converter reads them from a release: the
folder's ``scheduler_config.json`` when present, else ``vocab_size - 1`` of its transformer config
(never the logits width); the fixture's own ``mask_token_id`` is checked against it. With
``--checkpoint CKPT`` the models and conventions come from a converted model checkpoint instead
(e.g. ``tools/tiny_release`` of the fixture, converted): the fixture folder then only supplies
the cases.

One line per check: max abs error, tolerance, PASS/FAIL. Float tolerance: ``1e-4 * max(1, max|ref|)``
(``1e-4 * max|ref|`` for the small raw attention scores); token ids exact (argmax exact except at
near-ties, top-2 gap < 1e-4). Exit status 1 on any FAIL. Parity runs with full-precision float32
matmuls (``jax.default_matmul_precision('highest')``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable

import numpy as np

TIE_GAP = 1e-4


@dataclasses.dataclass
class Result:
    name: str
    err: float
    tol: float
    ok: bool
    note: str = ""

    def line(self) -> str:
        status = "PASS" if self.ok else "FAIL"
        if self.tol == 0 and self.note:
            return f"{status}  {self.name:<44} {self.note}"
        return f"{status}  {self.name:<44} max_abs_err={self.err:.3g}  tol={self.tol:.3g}  {self.note}".rstrip()


def float_check(name: str, got, ref, *, relative: bool = False) -> Result:
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return Result(name, float("inf"), 0.0, False, f"shape {got.shape} != reference {ref.shape}")
    scale = np.max(np.abs(ref)) if ref.size else 0.0
    tol = 1e-4 * (scale if relative else max(1.0, scale))
    diff = np.abs(got - ref)
    finite = np.isfinite(ref)
    err = float(np.max(diff[finite])) if finite.any() else 0.0
    ok = bool(err <= tol) and bool(np.all(np.isfinite(got[finite])))
    return Result(name, err, tol, ok)


def exact_check(name: str, got, ref, *, skip=None) -> Result:
    got = np.asarray(got)
    ref = np.asarray(ref)
    if got.shape != ref.shape:
        return Result(name, float("inf"), 0.0, False, f"shape {got.shape} != reference {ref.shape}")
    neq = got != ref
    skipped = 0
    if skip is not None:
        skipped = int(np.sum(neq & skip))
        neq = neq & ~skip
    n = int(np.sum(neq))
    note = f"{n} of {ref.size} differ" + (f" ({skipped} differing near-ties skipped)" if skip is not None else "")
    return Result(name, float(n), 0.0, n == 0, note)


def logits_checks(prefix: str, logits: np.ndarray, cases: dict, rows: np.ndarray) -> list[Result]:
    """Compare ``logits`` [B, H, W, K] with the stored rows / max / lse / argmax of ``prefix``."""
    out = []
    logits = np.asarray(logits, np.float64)
    if f"{prefix}_rows" in cases:
        out.append(float_check(f"{prefix}_rows", logits[:, rows].transpose(0, 3, 1, 2), cases[f"{prefix}_rows"]))
    if f"{prefix}_max" in cases:
        out.append(float_check(f"{prefix}_max", logits.max(-1), cases[f"{prefix}_max"]))
    if f"{prefix}_lse" in cases:
        m = logits.max(-1, keepdims=True)
        lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
        out.append(float_check(f"{prefix}_lse", lse, cases[f"{prefix}_lse"]))
    if f"{prefix}_argmax" in cases:
        gap = cases.get(f"{prefix}_top2gap")
        out.append(exact_check(f"{prefix}_argmax", logits.argmax(-1), cases[f"{prefix}_argmax"],
                               skip=None if gap is None else gap < TIE_GAP))
    return out


def load_png(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.float32) / 255.0


# ----------------------------------------------------------------------------- cases
def case_a(models, cases, compiler_options: dict | None = None) -> list[Result]:
    """The transformer's logits; ``compiler_options``: XLA options of the compiled forwards."""
    import jax

    tr = models["transformer"]
    rows = cases["logit_rows"]
    fwd = jax.jit(lambda ids, ref, txt, pooled, mc, t, s: tr(ids, ref, txt, pooled, mc, t, reference_strength=s)[0],
                  compiler_options=compiler_options)
    fwd_noref = jax.jit(lambda ids, txt, pooled, mc, t: tr(ids, None, txt, pooled, mc, t)[0],
                        compiler_options=compiler_options)
    args = (cases["a_ids"], cases["a_ref_ids"], cases["a_encoder_hidden_states"],
            cases["a_pooled_projections"], cases["a_micro_conds"], cases["a_timestep"])
    out = logits_checks("a_logits_ref_s10", fwd(*args, 1.0), cases, rows)
    s = float(cases.get("a_reference_strength_b", 1.1))
    out += logits_checks("a_logits_ref_s11", fwd(*args, s), cases, rows)
    out += logits_checks("a_logits_noref", fwd_noref(args[0], *args[2:]), cases, rows)
    return out


def case_b(models, cases, fixture_dir) -> list[Result]:
    import jax

    vq = models["vq"]
    out = []
    encode = jax.jit(vq.encode)
    quantize = jax.jit(vq.quantize)
    if "b_image" in cases:
        img = cases["b_image"].transpose(0, 2, 3, 1)
        lat = encode(img)
        out.append(float_check("b_latents", np.asarray(lat).transpose(0, 3, 1, 2), cases["b_latents"]))
        out.append(exact_check("b_ids", quantize(lat), cases["b_ids"]))
        dec = jax.jit(vq.decode_ids)(cases["b_ids"])
        out.append(float_check("b_decoded", np.asarray(dec).transpose(0, 3, 1, 2), cases["b_decoded"]))
    src = os.path.join(fixture_dir, "source.png")
    if "d_ref_latents" in cases and os.path.isfile(src):
        lat = encode(load_png(src)[None])
        out.append(float_check("d_ref_latents", np.asarray(lat).transpose(0, 3, 1, 2), cases["d_ref_latents"]))
        out.append(exact_check("d_ref_ids", quantize(lat), cases["d_ref_ids"]))
    return out


def case_c(models, cases) -> list[Result]:
    import jax

    out = []
    if "clip" in models and "c_clip_ids" in cases:
        emb, hidden = jax.jit(models["clip"])(cases["c_clip_ids"])
        out.append(float_check("c_clip_text_embeds", emb, cases["c_clip_text_embeds"]))
        if "c_clip_last_hidden_state" in cases:
            out.append(float_check("c_clip_last_hidden_state", hidden, cases["c_clip_last_hidden_state"]))
    if "gemma" in models and "c_gemma_ids" in cases:
        gemma = models["gemma"]
        m2, hs = jax.jit(lambda ids: gemma(ids, return_all=True))(cases["c_gemma_ids"])
        out.append(float_check("c_gemma_hidden_states_m2", m2, cases["c_gemma_hidden_states_m2"]))
        if "c_gemma_hidden_states" in cases:
            out.append(float_check("c_gemma_hidden_states", np.stack([np.asarray(h) for h in hs]),
                                   cases["c_gemma_hidden_states"]))
    return out


def case_d(models, cases, fixture_dir, conventions) -> list[Result]:
    import jax
    import jax.numpy as jnp

    from editmgt_jax.sampling.config import SamplerSettings
    from editmgt_jax.sampling.region_hold import sample

    tr, vq = models["transformer"], models["vq"]
    mask_id = conventions.mask_token_id
    src = os.path.join(fixture_dir, "source.png")
    if os.path.isfile(src):
        ref_ids = np.asarray(jax.jit(vq.encode_ids)(load_png(src)[None]))
    else:
        ref_ids = cases["d_ref_ids"]
    out = [exact_check("d_ref_ids (pipeline)", ref_ids, cases["d_ref_ids"])]
    if "mask_token_id" in cases:
        r = exact_check("mask_token_id", np.int64(mask_id), np.int64(cases["mask_token_id"]))
        r.note = f"{mask_id} ({conventions.source}), fixture {int(cases['mask_token_id'])}"
        out.append(r)
    steps = int(cases["d_num_inference_steps"])
    blocks = tuple(int(b) for b in cases["d_attention_blocks"])
    base = dict(steps=steps, guidance_scale=float(cases["d_guidance_scale"]),
                reference_strength=float(cases["d_reference_strength"]), greedy=True,
                mask_token_id=mask_id, timestep_convention=conventions.timestep_convention)
    mc = jnp.asarray(cases["d_micro_conds"], jnp.float32)[None]

    def run(**over):
        cfg, knobs = SamplerSettings(**{**base, **over}).split(record=True, record_logits=True)

        @jax.jit
        def go(knobs, ref, txt, pooled, ntxt, npooled):
            return sample(tr, cfg, knobs, ref, txt, pooled, ntxt, npooled, micro_conds=mc)

        return jax.tree.map(np.asarray, go(knobs, ref_ids, cases["d_encoder_hidden_states"], cases["d_prompt_embeds"],
                                           cases["d_negative_encoder_hidden_states"],
                                           cases["d_negative_prompt_embeds"]))

    rec = run(hold_threshold=float(cases["d_local_guidance"]), consolidation_blocks=blocks)
    for k in ("tokens_before", "tokens_after", "hold", "remask", "mask_len"):
        ref = cases[f"d_{k}"]
        got = rec[k].reshape(ref.shape) if rec[k].size == ref.size else rec[k]
        out.append(exact_check(f"d_{k}", got, ref))
    skip = (cases["d_remask"].reshape(cases["d_pred_x0"].shape) & (cases["d_logits_top2gap"] < TIE_GAP))
    out.append(exact_check("d_pred_x0", rec["pred_x0"].reshape(cases["d_pred_x0"].shape), cases["d_pred_x0"],
                           skip=skip))
    if "score_blocks" in rec:
        out.append(float_check("d_score_blocks", rec["score_blocks"], cases["d_score_blocks"], relative=True))
    out.append(float_check("d_score_raw", rec["score_raw"], cases["d_score_raw"], relative=True))
    for k in ("score_rescaled", "score_smoothed", "score_upsampled"):
        out.append(float_check(f"d_{k}", rec[k].reshape(cases[f"d_{k}"].shape), cases[f"d_{k}"]))
    if "logits" in rec:
        lg = rec["logits"]  # [steps, H, W, K] CFG-combined, batch 1
        out += logits_checks("d_logits", lg, cases, cases["logit_rows"])
    final = rec["tokens"]
    out.append(exact_check("d_final_tokens", final, cases["d_final_tokens"]))
    if "d_final_image_crop" in cases:
        # leftover mask ids (none after the last step) decode as code 0, as the official decode does
        safe = jnp.where((final >= vq.cfg.num_vq_embeddings) | (final == mask_id), 0, final)
        img = np.clip(np.asarray(jax.jit(vq.decode_ids)(safe)), 0, 1)
        h, w = cases["d_final_image_crop"].shape[:2]
        out.append(float_check("d_final_image_crop", img[0, :h, :w], cases["d_final_image_crop"]))
    if "d_final_tokens_lambda0" in cases:
        r0 = run(hold_threshold=0.0, consolidation_blocks=())
        out.append(exact_check("d_tokens_after_lambda0", r0["tokens_after"], cases["d_tokens_after_lambda0"]))
        out.append(exact_check("d_final_tokens_lambda0", r0["tokens"], cases["d_final_tokens_lambda0"]))
    if "d_final_tokens_lambda101" in cases:
        r1 = run(hold_threshold=1.01, consolidation_blocks=blocks)
        out.append(exact_check("d_tokens_after_lambda101", r1["tokens_after"], cases["d_tokens_after_lambda101"]))
        out.append(exact_check("d_final_tokens_lambda101", r1["tokens"], cases["d_final_tokens_lambda101"]))
    return out


# ----------------------------------------------------------------------------- driver
def load_models(fixture_dir: str, log: Callable[[str], None]) -> dict:
    from editmgt_jax.convert import COMPONENTS, load_fixture_component
    from editmgt_jax.convert.registry import instantiate

    models = {}
    for name, comp in COMPONENTS.items():
        t0 = time.time()
        got = load_fixture_component(fixture_dir, comp)
        if got is None:
            continue
        cfg, params = got
        models[name] = instantiate(comp, cfg, params)
        log(f"       converted {comp.fixture_prefix}.safetensors -> {name} ({time.time() - t0:.1f}s)")
    return models


def load_checkpoint_models(ckpt: str, log: Callable[[str], None]) -> dict:
    """The components of a converted model checkpoint, as the Editor loads them."""
    from editmgt_jax import checkpoints
    from editmgt_jax.convert import COMPONENTS
    from editmgt_jax.checkpoints import load_module

    models = {}
    for name, cfg in checkpoints.read_config(ckpt)["components"].items():
        if name in COMPONENTS:
            t0 = time.time()
            models[name] = load_module(ckpt, name, cfg)
            log(f"       loaded {name} from {ckpt} ({time.time() - t0:.1f}s)")
    return models


def checkpoint_differences(fixture_dir: str, ckpt: str) -> list[str]:
    """How the components a model checkpoint shares with a fixture folder differ in configuration
    (``"transformer.vocab_size: fixture 112, checkpoint 104"``); empty when they agree."""
    import json

    from editmgt_jax import checkpoints
    from editmgt_jax.convert import COMPONENTS
    from editmgt_jax.convert.registry import config_from_official, read_json

    def plain(v):
        return json.loads(json.dumps(v, default=checkpoints.json_default))

    diffs = []
    for name, saved in checkpoints.read_config(ckpt)["components"].items():
        comp = COMPONENTS.get(name)
        cfg_path = os.path.join(fixture_dir, f"{comp.fixture_prefix}_config.json") if comp else ""
        if not comp or not os.path.isfile(cfg_path):
            continue
        cfg = config_from_official(comp, read_json(cfg_path), cfg_path)
        want = plain(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
        have = plain(saved)
        diffs += [f"{name}.{k}: fixture {want[k]}, checkpoint {have[k]}"
                  for k in sorted(set(want) & set(have)) if want[k] != have[k]]
    return diffs


def check_reference(fixture_dir: str, *, cases_filter: str = "abcd", checkpoint: str | None = None,
                    log: Callable[[str], None] = print) -> list[Result]:
    import jax

    from editmgt_jax import checkpoints
    from editmgt_jax.convert import fixture_conventions

    fixture_dir = os.fspath(fixture_dir)
    npz = os.path.join(fixture_dir, "cases.npz")
    if not os.path.isfile(npz):
        raise FileNotFoundError(f"{fixture_dir}: no cases.npz")
    with np.load(npz) as z:
        cases = {k: z[k] for k in z.files}
    results: list[Result] = []
    with jax.default_matmul_precision("highest"):
        if checkpoint is not None:
            diffs = checkpoint_differences(fixture_dir, os.fspath(checkpoint))
            if diffs:
                raise ValueError(f"--checkpoint {checkpoint}: this checkpoint is not the fixture's configuration ("
                                 + "; ".join(diffs[:4]) + (f"; {len(diffs) - 4} more" if len(diffs) > 4 else "")
                                 + f"); check it against the fixture folder it was converted from")
            models = load_checkpoint_models(os.fspath(checkpoint), log)
        else:
            models = load_models(fixture_dir, log)
        conventions = None
        if "transformer" in models:
            conventions = (checkpoints.read_conventions(os.fspath(checkpoint)) if checkpoint is not None
                           else fixture_conventions(fixture_dir))
            log(f"       mask token id {conventions.mask_token_id} (from {conventions.source})")
        plan = [
            ("a", "transformer forward", lambda: case_a(models, cases),
             "transformer" in models and "a_ids" in cases),
            ("b", "VQ tokenizer", lambda: case_b(models, cases, fixture_dir),
             "vq" in models and ("b_image" in cases or "d_ref_latents" in cases)),
            ("c", "text encoders", lambda: case_c(models, cases),
             ("clip" in models and "c_clip_ids" in cases) or ("gemma" in models and "c_gemma_ids" in cases)),
            ("d", "edit pipeline", lambda: case_d(models, cases, fixture_dir, conventions),
             "transformer" in models and "vq" in models and "d_tokens_after" in cases),
        ]
        for key, title, fn, present in plan:
            if key not in cases_filter:
                continue
            if not present:
                log(f"SKIP  case {key} ({title}): not in this fixture folder")
                continue
            t0 = time.time()
            log(f"== case {key}: {title}")
            res = fn()
            for r in res:
                log(r.line())
            log(f"       ({time.time() - t0:.1f}s)")
            results += res
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m editmgt_jax.tools.check_reference",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fixture_dir", help="folder with *_config.json, *.safetensors and cases.npz")
    p.add_argument("--cases", default="abcd", help="which cases to run (letters, default abcd)")
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="check a converted model checkpoint (its components and conventions) against "
                        "the folder's cases instead of the folder's own weights")
    args = p.parse_args(argv)
    from editmgt_jax import checkpoints

    try:
        results = check_reference(args.fixture_dir, cases_filter=args.cases, checkpoint=args.checkpoint)
    except (FileNotFoundError, ValueError, checkpoints.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
