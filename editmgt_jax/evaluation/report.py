"""The evaluation report: JSON-ready values, metric definitions and the Markdown summary."""

from __future__ import annotations

import math

import numpy as np

METRIC_DOC = {
    "clean_success": "the headline: fraction of edits that happened inside the ground-truth mask "
                     "(edit_success) AND kept the rest of the picture (kept_outside); returning the source "
                     "scores 0, repainting everything scores 0",
    "kept_outside": "fraction of edits whose PSNR against the source outside the mask is >= 30 dB (judged when "
                    "outside covers >= 5% of the picture)",
    "edit_success": "inside-only success: inside the ground-truth mask, the mean RGB distance "
                    "of edit to target is below half the source's (returning the source scores 0; it does not "
                    "look outside the mask, so a picture repainted everywhere can pass it)",
    "changed_token_acc": "among token positions where the target's ids differ from the source's, the "
                         "fraction the edit's final tokens get (copying the source scores 0)",
    "l1": "mean |edit - target| / 255, whole image (lower is better)",
    "psnr": "PSNR (dB) of edit vs target, whole image; per image capped at 100 dB",
    "ssim": "SSIM of edit vs target (Gaussian window, sigma 1.5, 11 taps, K1 .01, K2 .03, mean over RGB)",
    "psnr_in": "PSNR (dB) of edit vs target inside the ground-truth edit mask",
    "leak_l1_src": "L1 of edit vs source outside the ground-truth edit mask (leakage; lower is better)",
    "leak_psnr_src": "PSNR (dB) of edit vs source outside the ground-truth edit mask (higher = less leakage)",
    "leak_l1_rec": "L1 of edit vs the VQ reconstruction of the source, outside the mask",
    "leak_psnr_rec": "PSNR (dB) of edit vs the VQ reconstruction of the source, outside the mask",
    "iou_topk": "IoU of the top-k pixels of the upsampled consolidated map (k = mask area) with the mask",
    "iou_changed": "IoU with the mask of the token cells whose final id differs from the source's",
    "iou_changed_dilated": "the same region dilated by one token cell (8-neighbourhood)",
    "iou_fixed": "IoU of {upsampled consolidated map >= threshold} with the mask (threshold per run)",
    "auroc": "AUROC of the upsampled consolidated map for the mask pixels (rank-based, ties count half)",
}


def plain(x):
    """JSON-ready copy: tuples -> lists, numpy scalars -> Python, NaN/inf -> null."""

    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def fmt(x, key: str = "") -> str:
    if x is None:
        return "-"
    if key.startswith(("psnr", "leak_psnr")):
        return f"{x:.2f}"
    if key in ("edits_per_s",):
        return f"{x:.2f}"
    return f"{x:.4f}" if key.startswith(("l1", "leak_l1")) else f"{x:.3f}"


TABLE_COLUMNS = (("clean_success", "clean success"), ("kept_outside", "kept outside"),
                 ("edit_success", "inside-only success"), ("changed_token_acc", "changed-token acc"), ("l1", "L1"), ("psnr", "PSNR"), ("ssim", "SSIM"), ("psnr_in", "PSNR in mask"),
                 ("leak_psnr_src", "leak PSNR vs src"), ("leak_l1_src", "leak L1 vs src"),
                 ("leak_psnr_rec", "leak PSNR vs VQ rec"), ("leak_l1_rec", "leak L1 vs VQ rec"),
                 ("iou_topk", "IoU top-k"), ("iou_fixed", "IoU fixed"), ("auroc", "AUROC"),
                 ("iou_changed", "IoU changed tokens"), ("iou_changed_dilated", "IoU changed +1"))


def _table(rows: list[tuple[str, dict, float | None]], extra_first: str = "run") -> list[str]:
    head = [extra_first, "n"] + [h for _, h in TABLE_COLUMNS] + ["edits/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, summ, eps in rows:
        m = summ.get("metrics", {})
        cells = [name, str(summ.get("n_items", 0))]
        cells += [fmt((m.get(k) or {}).get("mean"), k) for k, _ in TABLE_COLUMNS]
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
    leak_median = base["metrics"]["leak_psnr_src"].get("median")
    ident = r["baselines"]["identity"]["metrics"]["psnr"]["mean"]
    if ceiling is not None and leak is not None:
        lines.append(f"Leakage PSNR of the base run: mean {leak:.2f} dB, median {fmt(leak_median, 'psnr')} dB; "
                     f"VQ reconstruction ceiling (mean): {ceiling:.2f} dB.")
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
            lines.append(f"| {name} | {desc} | {s.get('same_as') or ''} | {fmt(s.get('iou_threshold'))} | "
                         f"{first} |")
        lines.append("")
    lines += ["## Per category (base run)", ""]
    head = ["category", "n", "clean success", "kept outside", "inside-only success", "changed-token acc", "PSNR identity", "PSNR VQ rec", "PSNR",
            "L1", "SSIM", "leak PSNR vs src", "leak PSNR ceiling", "IoU top-k", "IoU fixed", "AUROC"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    idc = r["baselines"]["identity"]["per_category"]
    vqc = r["baselines"]["vq_reconstruction"]["per_category"]
    for c, s in base["per_category"].items():
        m = s["metrics"]
        g = lambda d, k: (d.get(c, {}).get("metrics", {}).get(k) or {}).get("mean")  # noqa: E731
        cells = [c, str(s["n_items"]), fmt(m["clean_success"]["mean"]), fmt(m["kept_outside"]["mean"]),
                 fmt(m["edit_success"]["mean"]), fmt(m["changed_token_acc"]["mean"]),
                 fmt(g(idc, "psnr"), "psnr"), fmt(g(vqc, "psnr"), "psnr"),
                 fmt(m["psnr"]["mean"], "psnr"), fmt(m["l1"]["mean"], "l1"), fmt(m["ssim"]["mean"]),
                 fmt(m["leak_psnr_src"]["mean"], "psnr"), fmt(g(vqc, "leak_psnr_src"), "psnr"),
                 fmt(m["iou_topk"]["mean"]), fmt(m["iou_fixed"]["mean"]), fmt(m["auroc"]["mean"]),
                 fmt(m["iou_changed"]["mean"])]
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
