"""Training metrics on disk: per-step JSON lines and TensorBoard scalars, read back and plotted."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping

import numpy as np
from absl import logging


class MetricWriter:
    """Per-step JSON lines + TensorBoard scalars (tensorboardX); only process 0 writes."""

    def __init__(self, workdir: str, active: bool):
        self.active = active
        self.jsonl = None
        self.tb = None
        if not active:
            return
        path = os.path.join(workdir, "metrics.jsonl")
        # A run killed mid-write can leave a partial last line; start a fresh one after it.
        if os.path.exists(path) and os.path.getsize(path):
            with open(path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                cut = fh.read(1) != b"\n"
            if cut:
                with open(path, "a") as fh:
                    fh.write("\n")
        self.jsonl = open(path, "a", buffering=1)
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            logging.warning("tensorboardX is not installed: TensorBoard event files are not written "
                            "(pip install tensorboardX); metrics.jsonl has every step")
        else:
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def step(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.active:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")

    def scalars(self, step: int, prefix: str, metrics: Mapping[str, float]) -> None:
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{prefix}/{k}", float(v), step)

    def image(self, step: int, tag: str, array: np.ndarray) -> None:
        if self.tb is not None:
            self.tb.add_image(tag, array, step, dataformats="HWC")

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def metrics_rows(workdir: str) -> Iterator[dict]:
    """The rows of ``workdir``'s metrics.jsonl in order (none when there is no file); a line cut
    short by a kill, or anything else that is not a JSON object with a ``step``, is passed over."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "step" in row:
                yield row


def read_losses(workdir: str, key: str = "loss") -> dict[int, float]:
    """step -> value from metrics.jsonl; a step logged twice (re-run after a resume) keeps the last."""
    return {int(row["step"]): float(row[key]) for row in metrics_rows(workdir) if key in row}


def latest_evaluation(workdir: str, prefix: str = "eval_") -> dict | None:
    """The last held-out evaluation logged in metrics.jsonl (``{"step", "metrics"}``: every
    ``prefix*`` value of the newest step that has one), or None when the run logged none."""
    rows: dict[int, dict] = {}
    for row in metrics_rows(workdir):
        vals = {k: float(v) for k, v in row.items() if k.startswith(prefix) and isinstance(v, (int, float))}
        if vals:
            rows.setdefault(int(row["step"]), {}).update(vals)
    if not rows:
        return None
    step = max(rows)
    return {"step": step, "metrics": rows[step]}


def plot_losses(losses: Mapping[int, float], path: str, title: str = "training loss") -> None:
    """A loss-curve PNG (raw values and a moving average) drawn with PIL."""
    from PIL import Image, ImageDraw

    steps = np.array(sorted(losses))
    if len(steps) < 2:
        return
    vals = np.array([losses[s] for s in steps])
    finite = np.isfinite(vals)
    steps, vals = steps[finite], vals[finite]
    if len(steps) < 2:
        return
    w, h, pad = 800, 480, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    lo, hi = float(vals.min()), float(vals.max())
    hi = hi if hi > lo else lo + 1.0
    x = lambda s: pad + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (w - 2 * pad)  # noqa: E731
    y = lambda v: h - pad - (v - lo) / (hi - lo) * (h - 2 * pad)  # noqa: E731
    d.rectangle([pad, pad, w - pad, h - pad], outline="black")
    d.line([(x(s), y(v)) for s, v in zip(steps, vals)], fill=(170, 190, 230), width=1)
    k = max(1, len(vals) // 50)
    smooth = np.convolve(vals, np.ones(k) / k, mode="valid")
    d.line([(x(s), y(v)) for s, v in zip(steps[k - 1:], smooth)], fill=(20, 60, 200), width=2)
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        d.text((5, y(v) - 6), f"{v:.3g}", fill="black")
    d.text((pad, h - pad + 10), f"step {steps[0]}", fill="black")
    d.text((w - pad - 80, h - pad + 10), f"step {steps[-1]}", fill="black")
    d.text((pad, 20), f"{title} (moving average over {k})", fill="black")
    img.save(path)


def plot_curves(series: Mapping[str, Mapping[int, float]], path: str, title: str,
                lo: float = 0.0, hi: float = 1.0) -> None:
    """Several step -> value curves on one fixed-range axis (e.g. held-out edit success and
    changed-token accuracy in [0, 1]), each with its last value in the legend; drawn with PIL."""
    from PIL import Image, ImageDraw

    series = {k: {s: v for s, v in d.items() if np.isfinite(v)} for k, d in series.items()}
    series = {k: d for k, d in series.items() if d}
    if not series:
        return
    all_steps = [s for d in series.values() for s in d]
    s0, s1 = min(all_steps), max(all_steps)
    w, h, pad = 800, 480, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    x = lambda s: pad + (s - s0) / max(s1 - s0, 1) * (w - 2 * pad)  # noqa: E731
    y = lambda v: h - pad - (min(max(v, lo), hi) - lo) / (hi - lo) * (h - 2 * pad)  # noqa: E731
    d.rectangle([pad, pad, w - pad, h - pad], outline="black")
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        d.line([(pad, y(v)), (w - pad, y(v))], fill=(225, 225, 225))
        d.text((5, y(v) - 6), f"{v:.2f}", fill="black")
    colors = [(20, 60, 200), (200, 60, 20), (20, 150, 60), (140, 50, 190), (120, 120, 120)]
    for i, (name, pts) in enumerate(series.items()):
        steps = sorted(pts)
        c = colors[i % len(colors)]
        line = [(x(s), y(pts[s])) for s in steps]
        if len(line) > 1:
            d.line(line, fill=c, width=2)
        for px, py in line:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=c)
        d.text((pad + 10, pad + 8 + 14 * i), f"{name}: {pts[steps[-1]]:.3f} at step {steps[-1]}", fill=c)
    d.text((pad, h - pad + 10), f"step {s0}", fill="black")
    d.text((w - pad - 80, h - pad + 10), f"step {s1}", fill="black")
    d.text((pad, 20), title, fill="black")
    img.save(path)
