"""Held-out edit evaluation during training: do sampled edits succeed?

The masked-token loss and accuracy are dominated by the positions an edit leaves alone (copying the
source gets most of them right), so the trainer also runs the sampler on a fixed, category-balanced
subset of the held-out split and reports what the release evaluation reports
(``editmgt_jax.evaluation.metrics``):

* ``edit_success``: per item, inside the ground-truth edit region the decoded edit is closer to the
  target than half the source's distance (mean RGB distance at the working size); returning the
  source scores 0. Also per category (``edit_success/<category>``).
* ``changed_token_accuracy``: among the token positions where the target's ids differ from the
  source's, the fraction the sampled edit got (copying the source scores 0).

Images are brought to the working size exactly as ``Editor.prepare`` does (``imageio.fit_to_grid``,
centre crop), tokenised with the frozen tokenizer, edited with a greedy sampler of the configured
steps and guidance (no region hold, no compositing: the model's own output is judged), and decoded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from editmgt_jax import imageio
from editmgt_jax.evaluation import metrics


def balanced_indices(categories: Sequence[str], per_category: int) -> list[int]:
    """The first ``per_category`` indices of each category, in index order (a fixed subset)."""
    taken: dict[str, int] = {}
    out = []
    for i, c in enumerate(categories):
        if taken.get(c, 0) < per_category:
            taken[c] = taken.get(c, 0) + 1
            out.append(i)
    return out


def load_items(config, per_category: int) -> list:
    """``EvalItem``s of the held-out split at the working size (category-balanced, fixed)."""
    import os

    from editmgt_jax.evaluation.datasets import open_eval_set

    name, split = config.data.name, config.data.eval_split
    data_dir = os.path.expanduser(config.data.data_dir)
    base, _, cfg_name = name.partition("/")
    spec = f"{base}{'/' + cfg_name if cfg_name else ''}:{data_dir}:{split}"
    ds = open_eval_set(spec)
    # Categories repeat with the index in synthetic_edits; read a prefix large enough to fill them.
    n_scan = min(len(ds), per_category * 8 * 4)
    items = [ds[i] for i in range(n_scan)]
    keep = balanced_indices([it.category for it in items], per_category)
    size = int(config.editor.image_size)
    out = []
    for i in keep:
        it = items[i]
        if it.mask is None:
            continue
        src = imageio.fit_to_grid(it.source, size, 1, "crop")
        tgt = imageio.fit_to_grid(it.target, size, 1, "crop")
        m = imageio.fit_to_grid(np.repeat(it.mask[..., None].astype(np.uint8) * 255, 3, -1), size, 1,
                                "crop")[..., 0] > 127
        out.append(dict(id=it.id, source=src, target=tgt, mask=m, instruction=it.instruction,
                        category=it.category))
    return out


def score(items: list[dict], edits: np.ndarray, pred_ids: np.ndarray, source_ids: np.ndarray,
          target_ids: np.ndarray) -> dict[str, float]:
    """Aggregate edit success (overall and per category) and changed-token accuracy.

    ``edits`` ``[N, S, S, 3]`` uint8 decoded edits of ``items``; ids ``[N, h, w]``.
    """
    ok: dict[str, list[bool]] = {}
    for it, e in zip(items, edits):
        s = metrics.edit_success(e, it["target"], it["source"], it["mask"])
        if s is not None:
            ok.setdefault(it["category"], []).append(s)
    hits, changed = metrics.changed_token_counts(pred_ids, target_ids, source_ids)
    every = [v for vs in ok.values() for v in vs]
    out = {"edit_success": float(np.mean(every)) if every else float("nan"),
           "changed_token_accuracy": hits / changed if changed else float("nan")}
    for c, vs in sorted(ok.items()):
        out[f"edit_success/{c}"] = float(np.mean(vs))
    return out


class EditEval:
    """Runs the held-out edit evaluation of the current parameters (``__call__(params)`` -> dict)."""

    def __init__(self, config, program, aux, frozen_programs, tokenizer, *, per_category: int = 10):
        if "vq" not in frozen_programs:
            raise ValueError("the held-out edit evaluation needs the frozen tokenizer "
                             "(set editor.vq_checkpoint)")
        if config.editor.text.kind != "small":
            raise ValueError("the held-out edit evaluation supports editor.text.kind='small' only")
        self.config = config
        self.program = program
        self.aux = aux
        self.vq_prog = frozen_programs["vq"]
        self.items = load_items(config, per_category)
        self.instruction_ids = np.asarray(tokenizer([it["instruction"] for it in self.items])["ids"])
        self.sources = np.stack([it["source"] for it in self.items])
        self.targets = np.stack([it["target"] for it in self.items])
        self._fn = None

    def _build(self):
        import jax
        import jax.numpy as jnp

        from editmgt_jax.sampling.config import SamplerSettings
        from editmgt_jax.sampling.region_hold import sample
        from editmgt_jax.training.step import mask_token_id

        cfg = self.config
        defaults = dict(cfg.editor.get("sampler_defaults", {}) or {})
        # the micro-conditions the editor trains with (losses.default_micro_conds)
        res, aesthetic = float(cfg.data.resolution), float(cfg.editor.get("aesthetic", 6.0))
        guidance = float(defaults.get("guidance_scale", 3.0)) if float(cfg.editor.cond_dropout) > 0 else 1.0
        scfg, knobs = SamplerSettings(steps=int(defaults.get("steps", cfg.train.sample_steps)),
                                      guidance_scale=guidance,
                                      reference_strength=float(defaults.get("reference_strength", 1.0)),
                                      greedy=True, mask_token_id=mask_token_id(cfg),
                                      micro_conds=(res, res, 0.0, 0.0, aesthetic),
                                      timestep_convention=("mask_fraction" if cfg.editor.timestep_convention
                                                           == "mask_fraction" else "step_index")).split()
        model_prog, vq_prog = self.program.model, self.vq_prog

        def fn(params, aux, sources, targets, instruction_ids):
            model = model_prog.merge(params, aux["rest"])
            vq = vq_prog.merge(*aux["frozen"]["vq"])
            src = vq.encode_ids(sources.astype(jnp.float32) / 255.0)
            tgt = vq.encode_ids(targets.astype(jnp.float32) / 255.0)
            states, pooled = model.text_encoder(instruction_ids)
            empty = jnp.full((1, instruction_ids.shape[1]), model.text_encoder.config.pad_id, jnp.int32)
            nstates, npooled = model.text_encoder(empty)
            out = sample(model.transformer, scfg, knobs, src, states, pooled, nstates, npooled)
            n_codes = vq.cfg.num_vq_embeddings
            tokens = jnp.where(out["tokens"] >= n_codes, src, out["tokens"])
            pixels = jnp.clip(vq.decode_ids(tokens), 0.0, 1.0)
            return jnp.round(pixels * 255.0).astype(jnp.uint8), tokens, src, tgt

        return jax.jit(fn)

    def __call__(self, params) -> dict[str, float]:
        import jax

        if self._fn is None:
            self._fn = self._build()
        edits, pred, src, tgt = jax.device_get(self._fn(params, self.aux, self.sources, self.targets,
                                                        self.instruction_ids))
        return score(self.items, np.asarray(edits), np.asarray(pred), np.asarray(src), np.asarray(tgt))
