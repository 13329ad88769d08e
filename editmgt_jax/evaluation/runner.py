"""Evaluation runs: an editor over an evaluation set, baselines and ablations, one report.

``evaluate(EvalOptions(...))`` loads the set, edits it in batches (batch j uses seed + j), computes
the metrics of every edit, and writes report.json, report.md, per_item.jsonl and grids/ into
``options.out`` (the format is described in ``infer/evaluate.py``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import time

import numpy as np

from editmgt_jax.evaluation.ablations import (FALLBACK_LAMBDA, RunSpec, UsageError, block_presets, expand_runs,
                                              parse_ablations)
from editmgt_jax.evaluation.grids import write_grids
from editmgt_jax.evaluation.report import METRIC_DOC, plain, write_markdown

EDIT_KEYS = ("clean_success", "kept_outside", "edit_success", "changed_token_acc", "l1", "psnr", "ssim", "psnr_in", "leak_l1_src",
             "leak_psnr_src", "leak_l1_rec", "leak_psnr_rec")
MAP_KEYS = ("iou_topk", "iou_fixed", "auroc")
# IoU with the ground-truth mask of the cells whose final token differs from the source's (the
# region the edit actually changed), as is and dilated by one cell.
CHANGED_KEYS = ("iou_changed", "iou_changed_dilated")
METRIC_KEYS = EDIT_KEYS + MAP_KEYS + CHANGED_KEYS


@dataclasses.dataclass
class EvalOptions:
    """What to evaluate and how (the ``python -m infer.evaluate`` flags, same names and defaults)."""

    data: str                                   # evaluation set spec (editmgt_jax.evaluation.datasets)
    out: str                                    # folder for report.json, report.md, per_item.jsonl, grids/
    checkpoint: str | None = None               # model checkpoint folder (None: the shipped model)
    limit: int | None = None                    # evaluate the first N items only
    batch_size: int = 8                         # edits per compiled call
    seed: int = 0                               # batch j uses seed + j
    ablations: str = "none"                     # ablation runs (editmgt_jax.evaluation.ablations)
    size: int | None = None                     # working resolution (None: the checkpoint's)
    resize: str = "crop"                        # 'crop' or 'fit' (editmgt_jax.imageio.fit_to_grid)
    # base sampler settings: SamplerSettings field -> value (the rest: the checkpoint's)
    sampler: dict = dataclasses.field(default_factory=dict)
    negative_prompt: str | None = None
    iou_threshold: float | None = None          # fixed threshold for iou_fixed (None: each run's lambda)
    heatmap_upsample: str = "bilinear"          # 'bilinear' or 'nearest'
    grid_per_category: int = 3                  # example rows per category in the image grids
    mesh: str | None = None                     # data-parallel editing over devices, e.g. 'data=8'

def _fit_mask(mask, size: int, granularity: int, policy: str):

    from editmgt_jax import imageio

    m = np.repeat((np.asarray(mask, bool).astype(np.uint8) * 255)[..., None], 3, axis=-1)
    return imageio.fit_to_grid(m, size, granularity, policy)[..., 0] > 127


class Evaluation:
    """Holds the prepared evaluation set and computes baselines and runs."""

    def __init__(self, editor, items, *, size: int, policy: str, batch_size: int, seed: int,
                 iou_threshold: float | None, upsample: str, grid_k: int, common: dict):
        self.editor = editor
        self.items = items              # list of dicts: id, category, instruction, source, target, mask
        self.size, self.policy = size, policy
        self.batch_size = batch_size
        self.seed = seed
        self.iou_threshold = iou_threshold
        self.upsample = upsample
        self.common = common            # edit() arguments shared by every run (negative prompt)
        self.recon: list = [None] * len(items)
        self.source_ids: list = [None] * len(items)   # token ids of the prepared source and target
        self.target_ids: list = [None] * len(items)
        # grid rows: the first grid_k items of each category, plus the first items overall for the
        # ablation grid
        cats: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            cats.setdefault(it["category"], []).append(i)
        self.categories = sorted(cats)
        self.grid_items = {c: idx[:grid_k] for c, idx in cats.items()}
        self.ablation_grid_items = list(range(min(2, len(items))))
        self.kept: dict[str, dict[int, dict]] = {}

    # batches: items of one prepared shape, in order, chunked; batch j gets seed + j
    def batches(self, subset: list[int] | None = None) -> list[list[int]]:
        idx = list(range(len(self.items))) if subset is None else subset
        by_shape: dict[tuple, list[int]] = {}
        for i in idx:
            by_shape.setdefault(self.items[i]["source"].shape, []).append(i)
        out = []
        for group in by_shape.values():
            out += [group[s:s + self.batch_size] for s in range(0, len(group), self.batch_size)]
        return out

    def _padded(self, batch: list[int]) -> list[int]:
        """Pad a short batch by repeating its last item, so every call has one shape (one compile)."""
        return batch + [batch[-1]] * (self.batch_size - len(batch))

    def reconstruct_all(self):
        """VQ reconstructions of every source (the leakage ceiling and the second baseline)."""
        from tqdm import tqdm

        bar = tqdm(total=len(self.items), desc="VQ reconstruction", unit="img")
        for b in self.batches():
            pb = self._padded(b)
            rec = self.editor.reconstruct([self.items[i]["source"] for i in pb], size=self.size, policy=self.policy)
            for k, i in enumerate(b):
                self.recon[i] = rec[k]
            bar.update(len(b))
        bar.close()

    def tokenize_all(self):
        """Token ids of every prepared source and target (for changed-token accuracy)."""
        if not hasattr(self.editor, "encode_ids"):
            return   # an editor without a VQ tokenizer to read: no changed-token accuracy
        for b in self.batches():
            pb = self._padded(b)
            for key, store in (("source", self.source_ids), ("target", self.target_ids)):
                ids = self.editor.encode_ids([self.items[i][key] for i in pb])
                for k, i in enumerate(b):
                    store[i] = ids[k]

    def item_metrics(self, i: int, edit, heatmap=None, threshold: float = 0.5, tokens=None) -> dict:
        """All per-edit metrics of item ``i`` for the edited image ``edit`` (and its map, if any).

        ``edit_success`` (1/0; ``None`` without a mask) and ``changed_token_acc`` (of ``tokens``, the
        edit's final ids, against the target's ids where they differ from the source's).
        """
        from editmgt_jax.evaluation import metrics

        it = self.items[i]
        row = {"clean_success": None, "kept_outside": None, "edit_success": None, "changed_token_acc": None,
               "iou_changed": None, "iou_changed_dilated": None}
        if it["mask"] is not None:
            ok = metrics.clean_edit_success(edit, it["target"], it["source"], it["mask"])
            for key, name in (("clean_success", "clean"), ("kept_outside", "kept"), ("edit_success", "inside")):
                row[key] = None if ok[name] is None else float(ok[name])
        if tokens is not None and self.target_ids[i] is not None and np.shape(tokens) == np.shape(self.target_ids[i]):
            row["changed_token_acc"] = metrics.changed_token_accuracy(tokens, self.target_ids[i],
                                                                      self.source_ids[i])
            m = it["mask"]
            if m is not None and m.any() and not m.all():
                for key, d in (("iou_changed", 0), ("iou_changed_dilated", 1)):
                    row[key] = metrics.mask_iou(metrics.changed_region(tokens, self.source_ids[i], m.shape,
                                                                       dilate=d), m)
        row.update(metrics.edit_metrics(edit, it["target"], it["source"], recon=self.recon[i], mask=it["mask"]))
        if heatmap is not None and it["mask"] is not None:
            row.update(metrics.map_metrics(heatmap, it["mask"], threshold=threshold, upsample=self.upsample))
        else:
            row.update({k: None for k in MAP_KEYS})
        return row

    def summarize(self, rows: dict[int, dict]) -> dict:
        """Means (and counts) overall and per category of per-item metric rows."""
        from editmgt_jax.evaluation import metrics

        per_cat = {}
        for c in self.categories:
            sel = [r for i, r in rows.items() if self.items[i]["category"] == c]
            if sel:
                per_cat[c] = {"n_items": len(sel), "metrics": metrics.aggregate(sel, METRIC_KEYS)}
        return {"n_items": len(rows), "metrics": metrics.aggregate(list(rows.values()), METRIC_KEYS),
                "per_category": per_cat}

    def baseline(self, name: str) -> tuple[dict, dict[int, dict]]:
        """'identity' (the source is the edit) or 'vq_reconstruction' (its VQ round trip is)."""
        rows = {}
        for i, it in enumerate(self.items):
            edit = it["source"] if name == "identity" else self.recon[i]
            rows[i] = self.item_metrics(i, edit, tokens=self.source_ids[i])
        keep = {i: {"edit": (self.items[i]["source"] if name == "identity" else self.recon[i]), "heatmap": None}
                for i in self.ablation_grid_items}
        self.kept[name] = keep
        return self.summarize(rows), rows

    def run(self, spec: RunSpec, cfg, sampler_kwargs: dict) -> tuple[dict, dict[int, dict]]:
        """Edit every item (or, for inpainting, every item with a mask) with ``sampler_kwargs``."""
        from tqdm import tqdm

        subset = None
        if spec.inpaint:
            subset = [i for i, it in enumerate(self.items) if it["mask"] is not None and it["mask"].any()]
            if not subset:
                return ({"n_items": 0, "skipped": "no item has a non-empty ground-truth mask", "metrics": {},
                         "per_category": {}}, {})
        batches = self.batches(subset)
        threshold = self.iou_threshold if self.iou_threshold is not None else (
            cfg.hold_threshold if cfg.holds else 0.5)
        keep_idx = set(self.ablation_grid_items) | {i for v in self.grid_items.values() for i in v}
        rows: dict[int, dict] = {}
        kept: dict[int, dict] = {}
        times: list[float] = []
        seeds: list[int] = []
        any_heatmap = False
        bar = tqdm(total=sum(map(len, batches)), desc=f"run {spec.name}", unit="edit")
        for j, b in enumerate(batches):
            pb = self._padded(b)
            masks = [self.items[i]["mask"] for i in pb] if spec.inpaint else None
            seed = self.seed + j
            seeds.append(seed)
            t0 = time.perf_counter()
            res = self.editor.edit([self.items[i]["source"] for i in pb], [self.items[i]["instruction"] for i in pb],
                                   seed=seed, masks=masks, size=self.size, policy=self.policy,
                                   **self.common, **sampler_kwargs)
            times.append(time.perf_counter() - t0)
            heat = res.heatmaps
            any_heatmap |= heat is not None
            for k, i in enumerate(b):
                hm = None if heat is None else np.asarray(heat[k], np.float32)
                rows[i] = self.item_metrics(i, res.images[k], hm, threshold, tokens=None if res.tokens is None else res.tokens[k])
                if i in keep_idx:
                    kept[i] = {"edit": res.images[k], "heatmap": hm}
            bar.update(len(b))
        bar.close()
        # Steady-state rate: the first batch of each image shape compiles, so only the later ones count.
        shapes = [self.items[b[0]]["source"].shape for b in batches]
        warm = [j for j in range(len(batches)) if shapes[j] in shapes[:j]]
        if warm:
            steady = sum(len(batches[j]) for j in warm) / sum(times[j] for j in warm)
        else:
            # Every shape had one batch: time the first again, now compiled (the result is discarded).
            b = self._padded(batches[0])
            t0 = time.perf_counter()
            self.editor.edit([self.items[i]["source"] for i in b], [self.items[i]["instruction"] for i in b],
                             seed=self.seed, masks=[self.items[i]["mask"] for i in b] if spec.inpaint else None,
                             size=self.size, policy=self.policy, **self.common, **sampler_kwargs)
            steady = len(batches[0]) / (time.perf_counter() - t0)
        self.kept[spec.name] = kept
        summary = self.summarize(rows)
        summary["timing"] = {
            "wall_s": sum(times),                  # editor.edit calls only (compile included)
            "first_batch_s": times[0],             # includes compiling the program
            "edits_per_s": steady,                 # compiled rate (see above)
            "edits_per_s_incl_compile": len(rows) / sum(times),
            "batches": len(batches),
        }
        summary["seeds"] = seeds
        summary["iou_threshold"] = threshold if any_heatmap else None
        summary["has_heatmap"] = any_heatmap
        return summary, rows


def evaluate(args: EvalOptions, editor=None) -> dict:
    """Run the evaluation described by ``args``; returns the report (also written to ``args.out``).

    ``editor``: an already loaded `Editor` (or an object with its interface) instead of ``--checkpoint``.
    """
    import jax
    from tqdm import tqdm

    from editmgt_jax import parallel
    from editmgt_jax.editor import Editor
    from editmgt_jax.evaluation import datasets, metrics

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    groups = parse_ablations(args.ablations)
    data = datasets.open_eval_set(args.data)
    n = len(data) if args.limit is None else min(args.limit, len(data))

    if editor is None:
        t0 = time.time()
        mesh = parallel.parse_mesh_flag(args.mesh) if args.mesh else None
        editor = Editor.load(args.checkpoint, mesh_shape=mesh)
        print(f"loaded {editor.path} in {time.time() - t0:.1f}s", file=sys.stderr)
    size = args.size or editor.default_size
    if size % editor.pixel_granularity:
        raise UsageError(f"--size {size} is not a multiple of the model's pixel granularity {editor.pixel_granularity}")
    common = dict(**args.sampler, negative_prompt=args.negative_prompt)
    common = {k: v for k, v in common.items() if v is not None}
    sampler_common = {k: v for k, v in common.items() if k != "negative_prompt"}
    base_cfg = editor.sampler_config(**sampler_common)
    presets = block_presets(editor.tr_cfg.num_blocks)
    specs = [RunSpec("base", "base", {})] + expand_runs(groups, base_cfg, presets)

    items = []
    for k in tqdm(range(n), desc="loading", unit="item"):
        it = data[k]
        src = editor.prepare(it.source, size=size, policy=args.resize, name=f"{it.id} source")
        tgt = editor.prepare(it.target, size=size, policy=args.resize, name=f"{it.id} target")
        mask = None if it.mask is None else _fit_mask(it.mask, size, editor.pixel_granularity, args.resize)
        if mask is not None and mask.shape != src.shape[:2]:
            raise datasets.EvalDataError(f"{it.id}: mask of shape {mask.shape} does not match the source")
        items.append({"id": it.id, "category": it.category, "instruction": it.instruction,
                      "source": src, "target": tgt, "mask": mask})
    ev = Evaluation(editor, items, size=size, policy=args.resize, batch_size=args.batch_size, seed=args.seed,
                    iou_threshold=args.iou_threshold, upsample=args.heatmap_upsample,
                    grid_k=args.grid_per_category, common={k: v for k, v in common.items()
                                                           if k == "negative_prompt"})
    ev.reconstruct_all()
    ev.tokenize_all()
    os.makedirs(args.out, exist_ok=True)
    per_item_path = os.path.join(args.out, "per_item.jsonl")
    per_item = open(per_item_path, "w", encoding="utf-8")

    def dump_rows(run: str, rows: dict[int, dict]):
        for i in sorted(rows):
            rec = {"run": run, "id": items[i]["id"], "category": items[i]["category"], **rows[i]}
            per_item.write(json.dumps(plain(rec), allow_nan=False) + "\n")

    baselines = {}
    for name in ("identity", "vq_reconstruction"):
        baselines[name], rows = ev.baseline(name)
        dump_rows(name, rows)

    runs: dict[str, dict] = {}
    done: dict[tuple, str] = {}
    for spec in specs:
        kwargs = {**sampler_common, **spec.overrides}
        cfg = editor.sampler_config(**{k: v for k, v in kwargs.items() if k != "composite"})
        key = (cfg, spec.inpaint, kwargs.get("composite"))
        entry = {"group": spec.group, "overrides": dict(spec.overrides), "inpaint": spec.inpaint,
                 "sampler": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "micro_conds"}}
        if spec.note:
            entry["note"] = spec.note
        if key in done:
            same = done[key]
            entry.update({k: v for k, v in runs[same].items()
                          if k not in ("group", "overrides", "inpaint", "sampler", "note", "same_as")})
            entry["same_as"] = same
            ev.kept[spec.name] = ev.kept[same]
            print(f"run {spec.name}: same settings as {same}; results reused", file=sys.stderr)
        else:
            summary, rows = ev.run(spec, cfg, kwargs)
            entry.update(summary)
            dump_rows(spec.name, rows)
            done[key] = spec.name
        runs[spec.name] = entry
    per_item.close()

    grids = write_grids(args.out, ev, [s.name for s in specs])
    cats: dict[str, int] = {}
    for it in items:
        cats[it["category"]] = cats.get(it["category"], 0) + 1
    dev = jax.devices()[0]
    report = {
        "format": "editmgt-jax/eval-report",
        "version": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": os.path.abspath(editor.path),
        "data": {**data.describe(), "spec": args.data, "num_evaluated": n,
                 "categories": dict(sorted(cats.items())),
                 "with_mask": sum(it["mask"] is not None for it in items)},
        "settings": {
            "size": size, "resize": args.resize, "batch_size": args.batch_size, "seed": args.seed,
            "seed_rule": "batch j (items j*B .. j*B+B-1 of each image shape, in order) uses seed + j; "
                         "a short last batch is padded by repeating its last item",
            "limit": args.limit, "ablations": args.ablations,
            "base_sampler": {k: v for k, v in dataclasses.asdict(base_cfg).items() if k != "micro_conds"},
            "negative_prompt": args.negative_prompt,
            "block_presets": presets,
            "fallback_lambda": FALLBACK_LAMBDA,
            "iou_threshold": args.iou_threshold,
            "iou_threshold_rule": "iou_fixed uses --iou-threshold if given, else the run's hold_threshold "
                                  "when region hold is on, else 0.5; iou_topk keeps the k highest-scoring "
                                  "pixels, k = the mask's pixel count (ties at the cut are all kept)",
            "heatmap_upsample": args.heatmap_upsample,
            "psnr_cap_db": metrics.PSNR_CAP_DB,
            "psnr_cap_rule": "per-image PSNR is min(PSNR, cap): identical pixels (infinite PSNR) report the "
                             "cap, so no infinity reaches the JSON; means are over capped values",
            "null_rule": "null = undefined (no ground-truth mask, a mask that is empty or covers the "
                         "whole image, or no edit-region map in that run)",
        },
        "metrics_doc": METRIC_DOC,
        "baselines": baselines,
        "runs": runs,
        "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                        "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
                        "device_count": jax.device_count()},
    }
    report = plain(report)
    with open(os.path.join(args.out, "report.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, allow_nan=False)
        fh.write("\n")
    write_markdown(os.path.join(args.out, "report.md"), report, grids)
    return report
