"""Evaluate an editor on a benchmark: batched edits, metrics, baselines and ablations in one report.

  python -m infer.evaluate --checkpoint CKPT --data synthetic_edits:DATA_DIR --out eval/
  python -m infer.evaluate --checkpoint CKPT --data folder:bench/magicbrush --out eval/ --ablations all

Data (--data SPEC):
  synthetic_edits:DATA_DIR[:SPLIT]   the held-out split ('test') of a dataset built with
                                     `python -m train.build_dataset synthetic_edits --data-dir DATA_DIR`
                                     (synthetic_edits/CONFIG:... picks one of several builds;
                                     crispedit:DATA_DIR[:SPLIT] and tfds:BUILT_DIR[:SPLIT] work too)
  folder:PATH                        PATH/manifest.jsonl (or PATH.jsonl) with one
                                     {"source", "target", "instruction", "mask"?, "category"?, "id"?}
                                     per line, or PATH/<id>/{source,target,mask?}.<ext> + instruction.txt
                                     (+ category.txt); masks are white where the edit belongs
  PATH                               detected from what is there
  (full rules: editmgt_jax/evaluation/datasets.py)

Outputs in --out DIR:
  report.json     every number: settings, seeds, per run and baseline the mean of each metric overall
                  and per category (with the number of edits it is defined for), timings, edits/s
  report.md       summary tables and image grids (PNG files in DIR/grids/)
  per_item.jsonl  one line per (run, item) with the item's metrics

Metrics (per edit, averaged): l1, psnr, ssim against the target; psnr_in: PSNR against the target
inside the ground-truth mask; leak_l1_src / leak_psnr_src: L1 / PSNR outside the mask against the
source; leak_l1_rec / leak_psnr_rec: the same against the VQ reconstruction of the source (what a
perfect region hold gives); for the consolidated edit-region map (when the run captures attention):
iou_topk (top-k pixels, k = the mask's area), iou_fixed (score >= --iou-threshold, default the run's
region-hold lambda, or 0.5 without hold) and auroc. L1 is in [0, 1] of the pixel range; a per-image
PSNR of identical pixels is capped at 100 dB, so JSON holds no infinities; undefined values are null.

Baselines, in the same tables: 'identity' (return the source) and 'vq_reconstruction' (encode and
decode the source; its leak_psnr_src is the ceiling an editor that keeps every source token reaches).

Runs: 'base' uses the checkpoint's sampler settings with the sampler flags below applied. --ablations
adds runs, each the base settings plus one change, all with the same batches and seeds (batch j uses
seed S + j). LIST is comma-separated; each item is GROUP or GROUP=V1/V2/...:
  hold       on/off        region hold with the base lambda (fallback 0.3) vs lambda 0, same blocks
  blocks     none/early/late/all (or explicit lists such as 2-4)  consolidation blocks; early = the
             first third of all transformer blocks, late = the last third
  lambda     0.1/0.2/0.3/0.5   region-hold threshold sweep
  steps      8/16/36       decoding steps sweep
  cfg        1/3/6/9       classifier-free guidance sweep
  inpaint    gt            inpainting with the ground-truth mask (an upper bound for region hold)
  all        every group with its default values;  none  no ablations (default)
Runs that need consolidation blocks when the base has none use the 'late' preset. A run whose
settings equal an earlier run's reuses its results (noted as same_as in the JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import sys
import time

import numpy as np

from infer.edit import parse_blocks

DEFAULT_VALUES = {
    "hold": ("on", "off"),
    "blocks": ("none", "early", "late", "all"),
    "lambda": ("0.1", "0.2", "0.3", "0.5"),
    "steps": ("8", "16", "36"),
    "cfg": ("1", "3", "6", "9"),
    "inpaint": ("gt",),
}
GROUP_ALIASES = {"consolidation": "blocks", "region-hold": "hold", "guidance": "cfg", "lam": "lambda"}
FALLBACK_LAMBDA = 0.3
EDIT_KEYS = ("l1", "psnr", "ssim", "psnr_in", "leak_l1_src", "leak_psnr_src", "leak_l1_rec", "leak_psnr_rec")
MAP_KEYS = ("iou_topk", "iou_fixed", "auroc")
METRIC_KEYS = EDIT_KEYS + MAP_KEYS
METRIC_DOC = {
    "l1": "mean |edit - target| / 255, whole image (lower is better)",
    "psnr": "PSNR (dB) of edit vs target, whole image; per image capped at 100 dB",
    "ssim": "SSIM of edit vs target (Gaussian window, sigma 1.5, 11 taps, K1 .01, K2 .03, mean over RGB)",
    "psnr_in": "PSNR (dB) of edit vs target inside the ground-truth edit mask",
    "leak_l1_src": "L1 of edit vs source outside the ground-truth edit mask (leakage; lower is better)",
    "leak_psnr_src": "PSNR (dB) of edit vs source outside the ground-truth edit mask (higher = less leakage)",
    "leak_l1_rec": "L1 of edit vs the VQ reconstruction of the source, outside the mask",
    "leak_psnr_rec": "PSNR (dB) of edit vs the VQ reconstruction of the source, outside the mask",
    "iou_topk": "IoU of the top-k pixels of the upsampled consolidated map (k = mask area) with the mask",
    "iou_fixed": "IoU of {upsampled consolidated map >= threshold} with the mask (threshold per run)",
    "auroc": "AUROC of the upsampled consolidated map for the mask pixels (rank-based, ties count half)",
}


class UsageError(ValueError):
    """A bad command-line value; the message names the flag."""


# ------------------------------------------------------------------------------------ arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infer.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="model checkpoint folder (default: the shipped model in checkpoints/)")
    p.add_argument("--data", required=True, metavar="SPEC", help="evaluation set (see above)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for report.json, report.md and grids/")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N items only")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="edits per compiled call (default 8)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="base seed; batch j uses S + j (default 0)")
    p.add_argument("--ablations", default="none", metavar="LIST", help="ablation runs (see above; default none)")
    p.add_argument("--size", type=int, default=None, metavar="PX",
                   help="working resolution in pixels (default: the checkpoint's)")
    p.add_argument("--resize", choices=["crop", "fit"], default="crop",
                   help="how sources, targets and masks are brought to --size (default crop: short side "
                        "to --size, centre square)")
    s = p.add_argument_group("base sampler settings (defaults come from the checkpoint)")
    s.add_argument("--steps", type=int, help="decoding steps")
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = off)")
    s.add_argument("--strength", type=float, help="reference strength")
    s.add_argument("--hold-threshold", type=float, help="region-hold lambda (0 = off)")
    s.add_argument("--consolidation-blocks", type=parse_blocks, metavar="LIST",
                   help="blocks whose attention forms the edit-region map, e.g. '28-36' or '2,3,4'")
    s.add_argument("--greedy", action="store_true", help="deterministic decoding (argmax, no Gumbel noise)")
    s.add_argument("--negative-prompt", default=None, help="unconditional prompt for guidance")
    v = p.add_argument_group("ablation values and map metrics")
    v.add_argument("--iou-threshold", type=float, default=None, metavar="T",
                   help="fixed threshold for iou_fixed (default: each run's lambda, 0.5 without hold)")
    v.add_argument("--heatmap-upsample", choices=["bilinear", "nearest"], default="bilinear",
                   help="how token-grid maps are brought to pixels for IoU / AUROC (default bilinear)")
    o = p.add_argument_group("report")
    o.add_argument("--grid-per-category", type=int, default=3, metavar="K",
                   help="example rows per category in the image grids (default 3)")
    o.add_argument("--mesh", default=None, metavar="SPEC", help="data-parallel editing over devices, e.g. 'data=8'")
    return p


@dataclasses.dataclass
class RunSpec:
    """One sampler configuration to evaluate."""

    name: str
    group: str
    overrides: dict
    inpaint: bool = False
    note: str = ""


def parse_ablations(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """'hold,lambda=0.1/0.3,steps' -> [('hold', ('on', 'off')), ('lambda', ('0.1', '0.3')), ...]."""
    out: list[tuple[str, tuple[str, ...]]] = []
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        group, sep, vals = item.partition("=")
        group = GROUP_ALIASES.get(group.strip().lower(), group.strip().lower())
        if group == "none":
            continue
        if group == "all":
            if sep:
                raise UsageError(f"--ablations: 'all' takes no values (got {item!r})")
            out += list(DEFAULT_VALUES.items())
            continue
        if group not in DEFAULT_VALUES:
            raise UsageError(f"--ablations: unknown group {group!r} in {item!r}; groups: "
                             f"{', '.join(DEFAULT_VALUES)}, all, none")
        values = tuple(v.strip() for v in vals.split("/") if v.strip()) if sep else DEFAULT_VALUES[group]
        if not values:
            raise UsageError(f"--ablations: {item!r} lists no values")
        out.append((group, values))
    return out


def block_presets(num_blocks: int) -> dict[str, tuple[int, ...]]:
    """'early' / 'late' = the first / last third of all blocks (at least one), 'all', 'none'."""
    third = max(1, round(num_blocks / 3))
    return {"none": (), "early": tuple(range(third)), "late": tuple(range(num_blocks - third, num_blocks)),
            "all": tuple(range(num_blocks))}


def expand_runs(groups, base_cfg, presets: dict[str, tuple[int, ...]]) -> list[RunSpec]:
    """The ablation runs of ``groups`` (from `parse_ablations`) around the base sampler config."""
    blocks = tuple(base_cfg.consolidation_blocks) or presets["late"]
    lam = base_cfg.hold_threshold if base_cfg.hold_threshold > 0 else FALLBACK_LAMBDA
    runs: list[RunSpec] = []

    def num(group, v, kind):
        try:
            x = kind(v)
        except ValueError:
            raise UsageError(f"--ablations: {group}={v!r} is not a {kind.__name__}") from None
        if (kind is int and x < 1) or (kind is float and (x < 0 or not math.isfinite(x))):
            raise UsageError(f"--ablations: {group}={v!r} is out of range")
        return x

    for group, values in groups:
        for v in values:
            name = f"{group}={v}"
            if group == "hold":
                if v not in ("on", "off"):
                    raise UsageError(f"--ablations: hold takes on/off, got {v!r}")
                runs.append(RunSpec(name, group, {"consolidation_blocks": blocks,
                                                  "hold_threshold": lam if v == "on" else 0.0}))
            elif group == "blocks":
                if v in presets:
                    chosen = presets[v]
                else:
                    try:
                        chosen = parse_blocks(v.replace("+", ","))
                    except ValueError:
                        raise UsageError(f"--ablations: blocks={v!r}: use none/early/late/all or a list "
                                         f"such as 2-4") from None
                bad = [b for b in chosen if not 0 <= b < len(presets["all"])]
                if bad:
                    raise UsageError(f"--ablations: blocks={v!r}: block(s) {bad} outside 0..{len(presets['all']) - 1}")
                runs.append(RunSpec(name, group, {"consolidation_blocks": chosen,
                                                  "hold_threshold": lam if chosen else 0.0},
                                    note=f"blocks {list(chosen)}" if v in presets else ""))
            elif group == "lambda":
                x = num(group, v, float)
                runs.append(RunSpec(name, group, {"consolidation_blocks": blocks, "hold_threshold": x}))
            elif group == "steps":
                runs.append(RunSpec(name, group, {"steps": num(group, v, int)}))
            elif group == "cfg":
                runs.append(RunSpec(name, group, {"guidance_scale": num(group, v, float)}))
            elif group == "inpaint":
                if v != "gt":
                    raise UsageError(f"--ablations: inpaint takes 'gt' (the ground-truth mask), got {v!r}")
                runs.append(RunSpec(name, group, {}, inpaint=True, note="ground-truth mask; items without one skipped"))
    return runs


# ------------------------------------------------------------------------------------ helpers
def _plain(x):
    """JSON-ready copy: tuples -> lists, numpy scalars -> Python, NaN/inf -> null."""

    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def _fit_mask(mask, size: int, granularity: int, policy: str):

    from editmgt_jax import imageio

    m = np.repeat((np.asarray(mask, bool).astype(np.uint8) * 255)[..., None], 3, axis=-1)
    return imageio.fit_to_grid(m, size, granularity, policy)[..., 0] > 127


def _tile(img, side: int, min_side: int = 128):
    """An ``[H, W, 3]`` tile with its long side at most ``side``; small tiles are enlarged by a
    whole factor (nearest neighbour, pixels stay sharp) up to ``min_side``."""
    from PIL import Image

    h, w = img.shape[:2]
    if max(h, w) <= side:
        f = max(1, min_side // max(h, w))
        return np.repeat(np.repeat(img, f, axis=0), f, axis=1) if f > 1 else img
    s = side / max(h, w)
    return np.asarray(Image.fromarray(img).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR))


def image_grid(rows, *, gap: int = 2, tile: int = 256):
    """Rows of ``[H, W, 3] uint8`` tiles -> one image with white gaps (tiles padded to one size)."""

    rows = [[_tile(t, tile) for t in r] for r in rows]
    th = max(t.shape[0] for r in rows for t in r)
    tw = max(t.shape[1] for r in rows for t in r)
    ncol = max(len(r) for r in rows)
    out = np.full((len(rows) * (th + gap) + gap, ncol * (tw + gap) + gap, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, t in enumerate(r):
            y, x = gap + i * (th + gap), gap + j * (tw + gap)
            out[y:y + t.shape[0], x:x + t.shape[1]] = t
    return out


def mask_overlay(img, mask):
    """The source with the mask's pixels tinted red and the rest dimmed."""

    a = img.astype(np.float64)
    m = np.asarray(mask, bool)[..., None]
    red = np.array([255.0, 40.0, 40.0])
    out = np.where(m, 0.45 * a + 0.55 * red, 0.6 * a)
    return np.round(out).astype(np.uint8)


# ------------------------------------------------------------------------------------ evaluation
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

    def item_metrics(self, i: int, edit, heatmap=None, threshold: float = 0.5) -> dict:
        """All per-edit metrics of item ``i`` for the edited image ``edit`` (and its map, if any)."""
        from editmgt_jax.evaluation import metrics

        it = self.items[i]
        row = metrics.edit_metrics(edit, it["target"], it["source"], recon=self.recon[i], mask=it["mask"])
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
            rows[i] = self.item_metrics(i, edit)
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
                rows[i] = self.item_metrics(i, res.images[k], hm, threshold)
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


# ------------------------------------------------------------------------------------ report
def _fmt(x, key: str = "") -> str:
    if x is None:
        return "-"
    if key.startswith(("psnr", "leak_psnr")):
        return f"{x:.2f}"
    if key in ("edits_per_s",):
        return f"{x:.2f}"
    return f"{x:.4f}" if key.startswith(("l1", "leak_l1")) else f"{x:.3f}"


TABLE_COLUMNS = (("l1", "L1"), ("psnr", "PSNR"), ("ssim", "SSIM"), ("psnr_in", "PSNR in mask"),
                 ("leak_psnr_src", "leak PSNR vs src"), ("leak_l1_src", "leak L1 vs src"),
                 ("leak_psnr_rec", "leak PSNR vs VQ rec"), ("leak_l1_rec", "leak L1 vs VQ rec"),
                 ("iou_topk", "IoU top-k"), ("iou_fixed", "IoU fixed"), ("auroc", "AUROC"))


def _table(rows: list[tuple[str, dict, float | None]], extra_first: str = "run") -> list[str]:
    head = [extra_first, "n"] + [h for _, h in TABLE_COLUMNS] + ["edits/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, summ, eps in rows:
        m = summ.get("metrics", {})
        cells = [name, str(summ.get("n_items", 0))]
        cells += [_fmt((m.get(k) or {}).get("mean"), k) for k, _ in TABLE_COLUMNS]
        cells.append("-" if eps is None else f"{eps:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_markdown(path: str, report: dict, grids: dict) -> None:
    r = report
    base = r["runs"]["base"]
    lines = [f"# Evaluation: {r['data']['name']}", "",
             f"- checkpoint: `{r['checkpoint']}`",
             f"- items: {r['data']['num_evaluated']} of {r['data']['num_items']} "
             f"({', '.join(f'{c}: {n}' for c, n in r['data']['categories'].items())})",
             f"- working size: {r['settings']['size']} px ({r['settings']['resize']}), batch size "
             f"{r['settings']['batch_size']}, seed {r['settings']['seed']} (batch j uses seed + j)",
             "- base sampler: " + ", ".join(f"{k}={v}" for k, v in r["settings"]["base_sampler"].items()
                                             if k in ("steps", "guidance_scale", "reference_strength",
                                                      "hold_threshold", "consolidation_blocks", "greedy")),
             f"- device: {r['environment']['device']}; written {r['created']}", ""]
    lines += ["## Overall", "",
              "L1 in [0, 1] of the pixel range; PSNR in dB, per image capped at "
              f"{r['settings']['psnr_cap_db']:g} dB (identical pixels); leakage = outside the ground-truth "
              "edit mask; `-` = not defined (no mask, or no edit-region map for that run). "
              "edits/s: compiled (steady-state) rate.", ""]
    rows = [("identity (source)", r["baselines"]["identity"], None),
            ("VQ reconstruction", r["baselines"]["vq_reconstruction"], None)]
    rows += [(name, s, (s.get("timing") or {}).get("edits_per_s")) for name, s in r["runs"].items()]
    lines += _table(rows) + [""]
    ceiling = r["baselines"]["vq_reconstruction"]["metrics"]["leak_psnr_src"]["mean"]
    leak = base["metrics"]["leak_psnr_src"]["mean"]
    ident = r["baselines"]["identity"]["metrics"]["psnr"]["mean"]
    if ceiling is not None and leak is not None:
        lines.append(f"Leakage PSNR of the base run: {leak:.2f} dB; VQ reconstruction ceiling: {ceiling:.2f} dB "
                     f"(gap {ceiling - leak:.2f} dB).")
    if ident is not None and base["metrics"]["psnr"]["mean"] is not None:
        lines.append(f"PSNR against the target: base {base['metrics']['psnr']['mean']:.2f} dB, identity "
                     f"{ident:.2f} dB (difference {base['metrics']['psnr']['mean'] - ident:+.2f} dB).")
    lines.append("")
    if len(r["runs"]) > 1:
        lines += ["## Ablations", "",
                  "Each run is the base settings plus the change in its name; same batches and seeds.", "",
                  "| run | settings | same as | IoU threshold | first batch s |", "|---|---|---|---|---|"]
        for name, s in r["runs"].items():
            sampler = s.get("sampler", {})
            desc = ", ".join(f"{k}={sampler.get(k)}" for k in ("steps", "guidance_scale", "hold_threshold",
                                                                  "consolidation_blocks"))
            if s.get("inpaint"):
                desc += ", inpainting with the ground-truth mask"
            t = s.get("timing") or {}
            first = "-" if not t else f"{t['first_batch_s']:.1f}"
            lines.append(f"| {name} | {desc} | {s.get('same_as') or ''} | {_fmt(s.get('iou_threshold'))} | "
                         f"{first} |")
        lines.append("")
    lines += ["## Per category (base run)", ""]
    head = ["category", "n", "PSNR identity", "PSNR VQ rec", "PSNR", "L1", "SSIM", "leak PSNR vs src",
            "leak PSNR ceiling", "IoU top-k", "AUROC"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    idc = r["baselines"]["identity"]["per_category"]
    vqc = r["baselines"]["vq_reconstruction"]["per_category"]
    for c, s in base["per_category"].items():
        m = s["metrics"]
        g = lambda d, k: (d.get(c, {}).get("metrics", {}).get(k) or {}).get("mean")  # noqa: E731
        cells = [c, str(s["n_items"]), _fmt(g(idc, "psnr"), "psnr"), _fmt(g(vqc, "psnr"), "psnr"),
                 _fmt(m["psnr"]["mean"], "psnr"), _fmt(m["l1"]["mean"], "l1"), _fmt(m["ssim"]["mean"]),
                 _fmt(m["leak_psnr_src"]["mean"], "psnr"), _fmt(g(vqc, "leak_psnr_src"), "psnr"),
                 _fmt(m["iou_topk"]["mean"]), _fmt(m["auroc"]["mean"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if grids.get("categories"):
        lines += ["## Examples (base run)", "",
                  "Columns: source | target | edit | edit-region map over the source (blank without a map) | "
                  "ground-truth mask (red; blank without a mask).", ""]
        for c, (rel, ids) in grids["categories"].items():
            lines += [f"### {c}", "", f"![{c}]({rel})", "", "Items: " + ", ".join(f"`{i}`" for i in ids), ""]
    if grids.get("ablations"):
        rel, cols = grids["ablations"]
        lines += ["## Ablation examples", "", "Columns: " + " | ".join(cols) + ".", "", f"![ablations]({rel})", ""]
    lines += ["## Metric definitions", ""] + [f"- `{k}`: {v}" for k, v in METRIC_DOC.items()] + [""]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))


def write_grids(out_dir: str, ev: Evaluation, run_names: list[str]) -> dict:

    from editmgt_jax import imageio

    gdir = os.path.join(out_dir, "grids")
    os.makedirs(gdir, exist_ok=True)
    out: dict = {"categories": {}}
    base = ev.kept.get("base", {})
    for c in ev.categories:
        rows, ids = [], []
        for i in ev.grid_items.get(c, []):
            if i not in base:
                continue
            it = ev.items[i]
            blank = np.full_like(it["source"], 235)
            hm = base[i]["heatmap"]
            rows.append([it["source"], it["target"], base[i]["edit"],
                         imageio.heatmap_overlay(it["source"], hm) if hm is not None else blank,
                         mask_overlay(it["source"], it["mask"]) if it["mask"] is not None else blank])
            ids.append(it["id"])
        if rows:
            name = f"{_slug(c)}.png"
            imageio.save_image(os.path.join(gdir, name), image_grid(rows))
            out["categories"][c] = (f"grids/{name}", ids)
    cols = ["source", "target", "identity", "vq_reconstruction"] + run_names
    rows = []
    for i in ev.ablation_grid_items:
        it = ev.items[i]
        blank = np.full_like(it["source"], 235)
        row = [it["source"], it["target"]]
        row += [ev.kept.get(n, {}).get(i, {}).get("edit", blank) for n in cols[2:]]
        rows.append(row)
    if rows and len(run_names) > 1:
        imageio.save_image(os.path.join(gdir, "ablations.png"), image_grid(rows))
        out["ablations"] = ("grids/ablations.png", cols)
    return out


# ------------------------------------------------------------------------------------ main
def evaluate(args, editor=None) -> dict:
    """Run the evaluation described by parsed ``args``; returns the report (also written to ``args.out``).

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
    common = dict(steps=args.steps, guidance_scale=args.guidance, reference_strength=args.strength,
                  hold_threshold=args.hold_threshold, consolidation_blocks=args.consolidation_blocks,
                  greedy=True if args.greedy else None, negative_prompt=args.negative_prompt)
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
    os.makedirs(args.out, exist_ok=True)
    per_item_path = os.path.join(args.out, "per_item.jsonl")
    per_item = open(per_item_path, "w", encoding="utf-8")

    def dump_rows(run: str, rows: dict[int, dict]):
        for i in sorted(rows):
            rec = {"run": run, "id": items[i]["id"], "category": items[i]["category"], **rows[i]}
            per_item.write(json.dumps(_plain(rec), allow_nan=False) + "\n")

    baselines = {}
    for name in ("identity", "vq_reconstruction"):
        baselines[name], rows = ev.baseline(name)
        dump_rows(name, rows)

    runs: dict[str, dict] = {}
    done: dict[tuple, str] = {}
    for spec in specs:
        kwargs = {**sampler_common, **spec.overrides}
        cfg = editor.sampler_config(**kwargs)
        key = (cfg, spec.inpaint)
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
    report = _plain(report)
    with open(os.path.join(args.out, "report.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, allow_nan=False)
        fh.write("\n")
    write_markdown(os.path.join(args.out, "report.md"), report, grids)
    return report


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import editmgt_jax  # noqa: F401
    from editmgt_jax import checkpoints, imageio
    from editmgt_jax.editor import EditError
    from editmgt_jax.evaluation.datasets import EvalDataError

    try:
        t0 = time.time()
        report = evaluate(args)
    except (UsageError, EvalDataError, EditError, imageio.ImageError, checkpoints.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    base = report["runs"]["base"]["metrics"]
    ident = report["baselines"]["identity"]["metrics"]
    print(f"wrote {os.path.join(args.out, 'report.json')} and report.md in {time.time() - t0:.1f}s", file=sys.stderr)
    print(f"base: PSNR {_fmt(base['psnr']['mean'], 'psnr')} dB (identity {_fmt(ident['psnr']['mean'], 'psnr')}), "
          f"leak PSNR vs src {_fmt(base['leak_psnr_src']['mean'], 'psnr')} dB, "
          f"IoU top-k {_fmt(base['iou_topk']['mean'])}, AUROC {_fmt(base['auroc']['mean'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
