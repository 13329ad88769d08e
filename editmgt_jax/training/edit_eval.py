"""Held-out edit evaluation during training: would a person accept the edits?

The masked-token loss and accuracy are dominated by the positions an edit leaves alone, so the
trainer also edits a fixed, category-balanced subset of the held-out split with the program users
run: an ``Editor`` built from the current parameters and the conventions record the run exports
(its sampler settings, region hold and composite included), fed the held-out images at their own
size exactly as ``infer.edit`` would be. It reports what ``infer.evaluate`` reports
(``editmgt_jax.evaluation.metrics``):

* ``clean_success``: inside the ground-truth region the edit is closer to the target than half the
  source's distance, and outside it (when it covers at least 5% of the picture) the PSNR against
  the source is at least 30 dB; ``inside_success`` and ``kept_outside`` are the two halves. Also per
  category (``clean_success/<category>``).
* ``leak_psnr_src``: the median PSNR against the source outside the ground-truth region.
* ``map_auroc`` / ``map_iou``: the edit-region map against the ground-truth mask (AUROC; IoU of the
  map's top-k pixels, k = the mask's area), when the model's settings capture attention.
* ``changed_token_accuracy``: among the positions where the target's ids differ from the source's,
  the fraction the edit got.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from editmgt_jax.evaluation import metrics

SEED = 0   # the evaluation's sampling seed: every evaluation of a run draws the same noise


def balanced_indices(categories: Sequence[str], per_category: int) -> list[int]:
    """The first ``per_category`` indices of each category, in index order (a fixed subset)."""
    taken: dict[str, int] = {}
    out = []
    for i, c in enumerate(categories):
        if taken.get(c, 0) < per_category:
            taken[c] = taken.get(c, 0) + 1
            out.append(i)
    return out


def load_items(config, per_category: int) -> list[dict]:
    """Held-out items (source, target, mask at the dataset's own size; category-balanced, fixed)."""
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
    return [dict(id=items[i].id, source=items[i].source, target=items[i].target, mask=items[i].mask,
                 instruction=items[i].instruction, category=items[i].category)
            for i in keep if items[i].mask is not None]


def item_scores(item: dict, edit: np.ndarray, heatmap=None, tokens=None, source_ids=None, target_ids=None) -> dict:
    """Every per-item number of the evaluation (``None`` where it cannot be judged)."""
    row = metrics.clean_edit_success(edit, item["target"], item["source"], item["mask"])
    row["leak_psnr_src"] = metrics.psnr(edit, item["source"], region=~np.asarray(item["mask"], bool))
    row["map_auroc"] = row["map_iou"] = None
    if heatmap is not None:
        mm = metrics.map_metrics(heatmap, item["mask"], threshold=0.5)
        row["map_auroc"], row["map_iou"] = mm["auroc"], mm["iou_topk"]
    row["changed"] = row["hits"] = None
    if tokens is not None and target_ids is not None:
        row["hits"], row["changed"] = metrics.changed_token_counts(tokens, target_ids, source_ids)
    return row


def summarize(items: list[dict], rows: list[dict]) -> dict[str, float]:
    """Aggregate per-item rows: means of the success flags (overall and per category), medians of
    the leakage, means of the map scores, pooled changed-token accuracy."""
    def mean(key, sel=None):
        vals = [float(r[key]) for r in (sel if sel is not None else rows) if r[key] is not None]
        return float(np.mean(vals)) if vals else float("nan")

    leaks = [r["leak_psnr_src"] for r in rows if r["leak_psnr_src"] is not None]
    out = {"clean_success": mean("clean"), "inside_success": mean("inside"), "kept_outside": mean("kept"),
           "leak_psnr_src": float(np.median(leaks)) if leaks else float("nan"),
           "map_auroc": mean("map_auroc"), "map_iou": mean("map_iou")}
    changed = sum(r["changed"] or 0 for r in rows)
    out["changed_token_accuracy"] = sum(r["hits"] or 0 for r in rows) / changed if changed else float("nan")
    for c in sorted({it["category"] for it in items}):
        sel = [r for it, r in zip(items, rows) if it["category"] == c]
        out[f"clean_success/{c}"] = mean("clean", sel)
        out[f"inside_success/{c}"] = mean("inside", sel)
    return out


class EditEval:
    """Edits the held-out subset with the current parameters (``__call__(params)`` -> dict).

    The ``Editor`` is built once from the run's modules and conventions; each call swaps in the
    current parameters, so its compiled edit program is reused.
    """

    def __init__(self, config, program, rest, frozen, tokenizer, *, per_category: int = 10,
                 batch_size: int = 35):
        """``rest``: the trained model's non-parameter variables; ``frozen``: the run's
        ``tasks.FrozenEncoders`` (its VQ tokenizer edits)."""
        if frozen.vq is None:
            raise ValueError("the held-out edit evaluation needs the frozen tokenizer "
                             "(set editor.vq_checkpoint)")
        if config.editor.text.kind != "small":
            raise ValueError("the held-out edit evaluation supports editor.text.kind='small' only")
        from editmgt_jax.training.checkpoint import editor_conventions

        self.config = config
        self.program = program
        self.rest = rest
        self.vq = frozen.vq
        self.tokenizer = tokenizer
        self.conventions = editor_conventions(config)
        self.items = load_items(config, per_category)
        self.batch_size = int(batch_size)
        self._editor = None

    def editor(self, params):
        """The ``Editor`` of ``params`` (the one the run would export)."""
        from editmgt_jax.editor import Editor
        from editmgt_jax.text_side import SmallTextSide

        model = self.program.model.merge(params, self.rest)
        vq = self.vq.module()
        if self._editor is None:
            doc = {"conventions": self.conventions.to_dict()}
            self._editor = Editor(doc, {"vq": vq, "transformer": model.transformer},
                                  SmallTextSide(model.text_encoder, self.tokenizer))
        else:
            self._editor.set_states({"transformer": model.transformer, "text": model.text_encoder})
        return self._editor

    def edit_all(self, editor) -> list:
        return edit_batches(editor, self.items, self.batch_size)

    def __call__(self, params) -> dict[str, float]:
        return evaluate_editor(self.editor(params), self.items, self.batch_size)


def edit_batches(editor, items: list[dict], batch_size: int) -> list:
    """``(items, EditResult)`` per batch of ``batch_size`` items, batch ``j`` with seed ``SEED + j *
    batch_size`` (the last batch padded by repeating its last item: one compiled shape)."""
    results = []
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        pad = chunk + [chunk[-1]] * (batch_size - len(chunk))
        res = editor.edit([it["source"] for it in pad], [it["instruction"] for it in pad], seed=SEED + s)
        results.append((chunk, res))
    return results


def evaluate_editor(editor, items: list[dict], batch_size: int = 35) -> dict[str, float]:
    """The evaluation's numbers for any ``Editor`` (the trainer's, or one loaded from an exported
    model: the same model gives the same numbers)."""
    target_ids = [editor.encode_ids([editor.prepare(it["target"])])[0] for it in items]
    rows = []
    for chunk, res in edit_batches(editor, items, batch_size):
        for k, it in enumerate(chunk):
            i = len(rows)
            heat = None if res.heatmaps is None else res.heatmaps[k]
            rows.append(item_scores(it, res.images[k], heat, res.tokens[k], res.source_tokens[k], target_ids[i]))
    return summarize(items, rows)
