"""Edits files for batch editing (``python -m infer.edit --batch FILE.jsonl``).

One JSON object per line: ``{"image": PATH, "instruction": TEXT, "out": NAME.png, "mask": PATH?}``
(relative image and mask paths are relative to the file; ``out`` is a name inside the output
folder, sub-folders allowed, and defaults to the line number, ``00003.png`` for line 3). Every line
is checked before anything is compiled, so one bad line costs that line only: ``read_batch``
returns the runnable edits and one message per skipped line. No output may leave the output folder
or be any line's image or mask: source images are never replaced.
"""

from __future__ import annotations

import json
import os

from editmgt_jax import imageio


def read_batch(path: str, out_dir: str, heatmap: bool = False) -> tuple[list[dict], list[str]]:
    """Read and check an edits file: ``(runnable edits, one line per skipped edit)``.

    Every line is checked before anything is compiled: valid JSON object, ``image`` and a non-empty
    ``instruction``, the image (and mask) readable, ``out`` a writable image name inside ``out_dir``
    used once, and no file the edit writes (``<out>_heatmap.png`` too with ``heatmap``) the image or
    mask of any line."""
    from infer.edit_cli import output_files
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--batch {path}: cannot read ({e})") from None
    base = os.path.dirname(os.path.abspath(path))
    root = os.path.realpath(out_dir)
    items, skipped, outs = [], [], {}
    sources: dict[str, int] = {}        # every line's image and mask (real path -> line)
    for n, line in enumerate(lines, 1):
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        for k in ("image", "mask"):
            if isinstance(d, dict) and isinstance(d.get(k), str) and d[k]:
                sources.setdefault(os.path.realpath(os.path.join(base, d[k])), n)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"not valid JSON ({e})") from None
            if not isinstance(d, dict):
                raise ValueError(f"expected a JSON object, got {type(d).__name__}")
            for k in ("image", "instruction"):
                if k not in d:
                    raise ValueError(f"missing field {k!r}")
            if not isinstance(d["instruction"], str) or not d["instruction"].strip():
                raise ValueError("empty instruction")
            d.setdefault("out", f"{n:05d}.png")
            for k in ("image", "mask", "out"):
                if d.get(k) is not None and not isinstance(d[k], str):
                    raise ValueError(f"field {k!r} must be a string")
            for k in ("image", "mask"):
                if d.get(k) and not os.path.isabs(d[k]):
                    d[k] = os.path.join(base, d[k])
            out = os.path.join(out_dir, d["out"])
            real = os.path.realpath(out)
            if os.path.isabs(d["out"]) or os.path.commonpath([root, real]) != root:
                raise ValueError(f"out {d['out']!r}: must be a name inside the output folder {out_dir}")
            imageio.check_output_path(out, "out")
            for written in output_files(out, heatmap):
                hit = sources.get(os.path.realpath(written))
                if hit is not None:
                    raise ValueError(f"out {d['out']!r} would write {written}, the source image of line "
                                     f"{hit}; source images are never replaced")
            if os.path.abspath(out) in outs:
                raise ValueError(f"out {d['out']!r} is also line {outs[os.path.abspath(out)]}'s output")
            imageio.load_image(d["image"], name=f"image {d['image']}")
            if d.get("mask"):
                imageio.load_image(d["mask"], name=f"mask {d['mask']}")
        except ValueError as e:
            skipped.append(f"{where}: {e}")
            continue
        outs[os.path.abspath(out)] = n
        d["line"] = n
        items.append(d)
    if not items and not skipped:
        raise ValueError(f"--batch {path}: no edits in file")
    return items, skipped
