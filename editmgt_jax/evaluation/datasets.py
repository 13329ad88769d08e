"""Evaluation sets: edits with a source, an instruction, a reference target and (often) a mask.

Every set is a sequence of `EvalItem` (random access, loaded on demand), opened from a SPEC string
by `open_eval_set`:

``synthetic_edits:DATA_DIR[:SPLIT]`` (also ``synthetic_edits/CONFIG:...`` and ``crispedit:...``)
    A TFDS dataset built with ``python -m train.build_dataset`` into ``DATA_DIR``. The split defaults
    to the held-out one (``test`` for synthetic_edits, ``validation`` for crispedit). When
    ``DATA_DIR`` holds several builds (configs) of the dataset, name one with ``/CONFIG``. A built
    dataset folder (the one holding ``dataset_info.json``) can be given directly as well:
    ``tfds:PATH[:SPLIT]``. Features used: ``source_image``, ``target_image``, ``instruction``,
    ``category`` and, when present, ``edit_mask``.

``folder:PATH``
    A benchmark on disk, in one of two layouts (MagicBrush / Emu Edit style):

    1. a JSONL manifest, ``PATH/manifest.jsonl`` or ``PATH`` itself ending in ``.jsonl``: one JSON
       object per line with ``source`` (alias ``input``), ``target`` (alias ``output``),
       ``instruction``, and optionally ``mask``, ``category`` and ``id``. Paths are relative to the
       manifest's folder (absolute paths work too). Blank lines and lines starting with ``#`` are
       skipped.
    2. one folder per edit, ``PATH/<id>/``, holding ``source.<ext>`` (or ``input.<ext>``),
       ``target.<ext>`` (or ``output.<ext>``), ``instruction.txt``, and optionally ``mask.<ext>``
       and ``category.txt``; ``<ext>`` is any image format PIL reads (png, jpg, jpeg, webp, bmp,
       tif, tiff). Sub-folders without a source image are ignored; a sub-folder with a source but a
       missing target or instruction is an error naming it.

    Masks: white (grey level above 127, after compositing any alpha over black) marks the edited
    region; everything else is the region the edit should leave alone. Items without a mask get
    ``mask = None`` (their leakage and edit-map metrics are skipped). A missing category is
    ``'unknown'``.

A bare path is detected: a ``.jsonl`` file or a folder with ``manifest.jsonl`` -> manifest; a
folder with a ``synthetic_edits`` or ``crispedit`` sub-folder -> that TFDS dataset; a folder with
``dataset_info.json`` -> ``tfds:``; a folder of per-edit sub-folders -> folder layout 2.

Every problem (missing file, unreadable image, bad JSON line, missing field) raises
`EvalDataError` naming the file (and line) at fault.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Sequence

import numpy as np

from editmgt_jax import imageio

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MANIFEST_NAME = "manifest.jsonl"
TFDS_DATASETS = {"synthetic_edits": "test", "crispedit": "validation"}
UNKNOWN_CATEGORY = "unknown"


class EvalDataError(ValueError):
    """An evaluation set that cannot be read as documented; the message names the file at fault."""


@dataclasses.dataclass
class EvalItem:
    """One evaluation edit.

    Attributes:
      id: a name unique within the set (TFDS: ``<split>/<index>``; folders: the folder or manifest id).
      source, target: ``[H, W, 3] uint8`` images at their stored size.
      instruction: the edit instruction.
      mask: ``[H, W] bool`` ground-truth edit region at the source's size, or ``None``.
      category: edit category, ``'unknown'`` when the set has none.
    """

    id: str
    source: np.ndarray
    target: np.ndarray
    instruction: str
    mask: np.ndarray | None
    category: str = UNKNOWN_CATEGORY


class EvalSet(Sequence):
    """A named, indexable collection of `EvalItem`; items are read when indexed."""

    name: str = "eval set"

    def describe(self) -> dict:
        return {"name": self.name, "num_items": len(self)}


# ------------------------------------------------------------------------------------ images
def read_mask(path: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A mask image -> ``[H, W] bool`` (grey > 127 after alpha over black), resized to ``shape``."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise EvalDataError(f"{path}: mask file not found")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                im = Image.alpha_composite(black, rgba)
            grey = im.convert("L")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise EvalDataError(f"{path}: mask is not a readable image ({e})") from None
    if shape is not None and grey.size != (shape[1], shape[0]):
        grey = grey.resize((shape[1], shape[0]), Image.NEAREST)
    return np.asarray(grey) > 127


def _read_image(path: str, what: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise EvalDataError(f"{path}: {what} image not found")
    try:
        return imageio.load_image(path)
    except imageio.ImageError as e:
        raise EvalDataError(f"{what} image: {e}") from None


def _load_triplet(source: str, target: str, mask: str | None):
    src = _read_image(source, "source")
    tgt = _read_image(target, "target")
    if tgt.shape != src.shape:
        from PIL import Image

        # Benchmarks sometimes store targets at another size; compare at the source's.
        tgt = np.asarray(Image.fromarray(tgt).resize((src.shape[1], src.shape[0]), Image.BICUBIC))
    m = read_mask(mask, src.shape[:2]) if mask else None
    return src, tgt, m


# ------------------------------------------------------------------------------------ folders
class _EntrySet(EvalSet):
    """An `EvalSet` of `entries`: dicts with `id`, `source`, `target`, `mask` (image paths; mask may
    be None), `instruction`, `category` and, optionally, `where` (prefixed to a read error)."""

    entries: list[dict]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        e = self.entries[i]
        try:
            src, tgt, m = _load_triplet(e["source"], e["target"], e["mask"])
        except EvalDataError as err:
            if "where" not in e:
                raise
            raise EvalDataError(f"{e['where']}: {err}") from None
        return EvalItem(e["id"], src, tgt, e["instruction"], m, e["category"])


class ManifestSet(_EntrySet):
    """Layout 1: a JSONL manifest (see the module docstring)."""

    def __init__(self, manifest: str):
        self.manifest = os.path.abspath(manifest)
        self.root = os.path.dirname(self.manifest)
        self.name = f"folder:{self.manifest}"
        if not os.path.isfile(self.manifest):
            raise EvalDataError(f"{self.manifest}: manifest not found")
        self.entries: list[dict] = []
        seen: dict[str, int] = {}
        with open(self.manifest, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                text = line.strip()
                if not text or text.startswith("#"):
                    continue
                where = f"{self.manifest}:{lineno}"
                try:
                    rec = json.loads(text)
                except json.JSONDecodeError as e:
                    raise EvalDataError(f"{where}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise EvalDataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
                entry = {"where": where}
                for field, aliases, required in (("source", ("source", "input"), True),
                                                  ("target", ("target", "output"), True),
                                                  ("mask", ("mask",), False)):
                    val = next((rec[a] for a in aliases if rec.get(a) not in (None, "")), None)
                    if val is None:
                        if required:
                            raise EvalDataError(f"{where}: missing field {field!r} (or {aliases[1]!r})")
                        entry[field] = None
                        continue
                    if not isinstance(val, str):
                        raise EvalDataError(f"{where}: field {field!r} must be a path string")
                    entry[field] = val if os.path.isabs(val) else os.path.join(self.root, val)
                instr = rec.get("instruction")
                if not isinstance(instr, str) or not instr.strip():
                    raise EvalDataError(f"{where}: missing or empty field 'instruction'")
                entry["instruction"] = instr.strip()
                cat = rec.get("category")
                entry["category"] = str(cat).strip() if cat not in (None, "") else UNKNOWN_CATEGORY
                item_id = str(rec.get("id", os.path.splitext(os.path.basename(entry["source"]))[0]))
                if item_id in seen:  # ids must be unique: suffix repeated ones with the line number
                    item_id = f"{item_id}@{lineno}"
                seen[item_id] = lineno
                entry["id"] = item_id
                self.entries.append(entry)
        if not self.entries:
            raise EvalDataError(f"{self.manifest}: manifest holds no items")

    def describe(self) -> dict:
        return {"name": self.name, "kind": "folder", "layout": "manifest", "path": self.manifest,
                "num_items": len(self)}


def _find_image(folder: str, stems: Sequence[str]) -> str | None:
    for stem in stems:
        for ext in IMAGE_EXTENSIONS:
            for cand in (stem + ext, stem + ext.upper()):
                p = os.path.join(folder, cand)
                if os.path.isfile(p):
                    return p
    return None


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    except UnicodeDecodeError:
        raise EvalDataError(f"{path}: not UTF-8 text") from None


class FolderSet(_EntrySet):
    """Layout 2: one sub-folder per edit (see the module docstring)."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.name = f"folder:{self.root}"
        if not os.path.isdir(self.root):
            raise EvalDataError(f"{self.root}: not a folder")
        self.entries: list[dict] = []
        for sub in sorted(os.listdir(self.root)):
            d = os.path.join(self.root, sub)
            if not os.path.isdir(d):
                continue
            src = _find_image(d, ("source", "input"))
            if src is None:
                continue
            tgt = _find_image(d, ("target", "output"))
            if tgt is None:
                raise EvalDataError(f"{d}: has a source image but no target.<ext> (or output.<ext>); "
                                    f"image extensions read: {', '.join(IMAGE_EXTENSIONS)}")
            instr_path = os.path.join(d, "instruction.txt")
            if not os.path.isfile(instr_path):
                raise EvalDataError(f"{instr_path}: instruction file not found")
            instr = _read_text(instr_path)
            if not instr:
                raise EvalDataError(f"{instr_path}: instruction is empty")
            cat_path = os.path.join(d, "category.txt")
            cat = _read_text(cat_path) if os.path.isfile(cat_path) else ""
            self.entries.append({"id": sub, "dir": d, "source": src, "target": tgt,
                                 "mask": _find_image(d, ("mask",)), "instruction": instr,
                                 "category": cat or UNKNOWN_CATEGORY})
        if not self.entries:
            raise EvalDataError(
                f"{self.root}: no evaluation items found: expected {MANIFEST_NAME} or sub-folders "
                f"<id>/ with source.<ext>, target.<ext> and instruction.txt")

    def describe(self) -> dict:
        return {"name": self.name, "kind": "folder", "layout": "per-item folders", "path": self.root,
                "num_items": len(self)}


# ------------------------------------------------------------------------------------ TFDS
class TFDSSet(EvalSet):
    """A split of a built TFDS edit dataset (synthetic_edits, crispedit, or any with its features)."""

    REQUIRED = ("source_image", "target_image", "instruction")

    def __init__(self, dataset_dir: str, split: str | None = None, *, default_split: str = "test"):
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

        self.dataset_dir = os.path.abspath(dataset_dir)
        info = os.path.join(self.dataset_dir, "dataset_info.json")
        if not os.path.isfile(info):
            raise EvalDataError(f"{info}: not found; {self.dataset_dir} is not a built TFDS dataset")
        try:
            builder = tfds.builder_from_directory(self.dataset_dir)
        except Exception as e:  # pylint: disable=broad-except
            raise EvalDataError(f"{info}: cannot open the dataset ({e})") from None
        features = builder.info.features
        missing = [k for k in self.REQUIRED if k not in features]
        if missing:
            raise EvalDataError(f"{self.dataset_dir}: dataset lacks the feature(s) {missing}")
        splits = list(builder.info.splits)
        self.split = split or default_split
        if self.split not in splits:
            raise EvalDataError(f"{self.dataset_dir}: no split {self.split!r} (splits: {', '.join(splits)})")
        self.source = builder.as_data_source(split=self.split)
        self.has_mask = "edit_mask" in features
        cat = features["category"] if "category" in features else None
        self._cat_names = list(getattr(cat, "names", []) or []) if cat is not None else None
        self.builder_name = builder.name
        self.config_name = builder.builder_config.name if builder.builder_config else None
        self.name = f"{builder.name}/{self.config_name}:{self.split}" if self.config_name else \
            f"{builder.name}:{self.split}"

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        where = f"{self.dataset_dir} split {self.split!r} example {i}"
        try:
            ex = self.source[i]
        except Exception as e:  # pylint: disable=broad-except
            raise EvalDataError(f"{where}: cannot be read ({e})") from None
        instr = ex["instruction"]
        instr = instr.decode("utf-8") if isinstance(instr, bytes) else str(instr)
        cat = UNKNOWN_CATEGORY
        if self._cat_names is not None and "category" in ex:
            c = ex["category"]
            if isinstance(c, bytes):
                cat = c.decode("utf-8")
            elif self._cat_names:
                cat = self._cat_names[int(c)]
            else:
                cat = str(c)
        mask = None
        if self.has_mask:
            mask = np.asarray(ex["edit_mask"])
            mask = (mask[..., 0] if mask.ndim == 3 else mask) > 127
        src = np.asarray(ex["source_image"], np.uint8)
        tgt = np.asarray(ex["target_image"], np.uint8)
        return EvalItem(f"{self.split}/{i}", src, tgt, instr.strip(), mask, cat)

    def describe(self) -> dict:
        return {"name": self.name, "kind": "tfds", "path": self.dataset_dir, "dataset": self.builder_name,
                "config": self.config_name, "split": self.split, "num_items": len(self)}


def _tfds_build_dir(data_dir: str, name: str, config: str | None) -> str:
    """``DATA_DIR/<name>/<config>/<version>`` of a built dataset; picks the only build if unnamed."""
    base = os.path.join(os.path.abspath(data_dir), name)
    if not os.path.isdir(base):
        raise EvalDataError(f"{base}: not found; build it with "
                            f"`python -m train.build_dataset {name} --data-dir {data_dir}`")
    infos = sorted(glob.glob(os.path.join(base, config or "*", "*", "dataset_info.json")))
    if not infos:
        what = f"config {config!r}" if config else "any config"
        raise EvalDataError(f"{base}: no built dataset ({what}) with a dataset_info.json")
    configs = sorted({os.path.basename(os.path.dirname(os.path.dirname(p))) for p in infos})
    if len(configs) > 1:
        raise EvalDataError(f"{base}: several builds ({', '.join(configs)}); choose one with "
                            f"{name}/CONFIG:{data_dir}")
    def version(p: str) -> tuple[int, ...]:
        parts = os.path.basename(os.path.dirname(p)).split(".")
        return tuple(int(x) if x.isdigit() else -1 for x in parts)

    return os.path.dirname(max(infos, key=version))  # the newest version of that config


def open_eval_set(spec: str) -> EvalSet:
    """Open an evaluation set from a SPEC string (grammar in the module docstring)."""
    if not spec:
        raise EvalDataError("empty data spec")
    head, sep, rest = spec.partition(":")
    name, _, config = head.partition("/")
    if sep and name in TFDS_DATASETS:
        data_dir, split = rest, None
        if ":" in rest:
            d, _, s = rest.rpartition(":")
            if s and "/" not in s:
                data_dir, split = d, s
        return TFDSSet(_tfds_build_dir(data_dir, name, config or None), split,
                       default_split=TFDS_DATASETS[name])
    if sep and head == "tfds":
        path, split = rest, None
        if ":" in rest and not os.path.exists(rest):
            path, _, split = rest.rpartition(":")
        return TFDSSet(path, split or None)
    if sep and head == "folder":
        return _open_folder(rest)
    if sep and len(head) > 1 and not os.path.exists(spec):
        raise EvalDataError(f"data spec {spec!r}: unknown kind {head!r}; use "
                            f"{', '.join(TFDS_DATASETS)}, tfds or folder")
    return _detect(spec)


def _open_folder(path: str) -> EvalSet:
    if path.endswith(".jsonl"):
        return ManifestSet(path)
    if not os.path.exists(path):
        raise EvalDataError(f"{path}: not found")
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST_NAME)):
        return ManifestSet(os.path.join(path, MANIFEST_NAME))
    return FolderSet(path)


def _detect(path: str) -> EvalSet:
    if not os.path.exists(path):
        raise EvalDataError(f"{path}: not found (and not a data spec such as synthetic_edits:DIR or folder:DIR)")
    if path.endswith(".jsonl") or os.path.isfile(os.path.join(path, MANIFEST_NAME)):
        return _open_folder(path)
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
        return TFDSSet(path)
    for name, split in TFDS_DATASETS.items():
        if os.path.isdir(os.path.join(path, name)):
            return TFDSSet(_tfds_build_dir(path, name, None), None, default_split=split)
    if os.path.isdir(path):
        return FolderSet(path)
    raise EvalDataError(f"{path}: cannot tell what kind of evaluation set this is")
