"""CrispEdit-2M's parquet shards: finding them, checking their schema and `type` values, choosing
the held-out row groups, decode-checking images, and the report of skipped rows.

No TFDS here: the builder (`editmgt_jax.data.crispedit`) streams rows through these checks.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import zlib
from typing import Any

from PIL import Image

from editmgt_jax.data.categories import EDIT_CATEGORIES

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download the CrispEdit-2M parquet shards (the dataset's `data/<type>_NNNNN.parquet` files,
  about 4.6 TB) to a local folder RAW yourself, then pass RAW as the manual dir
  (`python -m train.build_dataset crispedit --manual-dir RAW ...`). Shards are read from
  RAW/data/*.parquet, or RAW/*.parquet. Nothing is downloaded by this builder.
  """

REQUIRED_COLUMNS = ("input_img", "output_img", "instruction", "type")

# A skip report keeps this many individual rows per reason (all of them are counted).
_MAX_LISTED_SKIPS = 100


class CrispEditSchemaError(ValueError):
  """A parquet shard differs from the published CrispEdit-2M layout."""


@dataclasses.dataclass
class SkipReport:
  """Rows that were skipped while building, by reason and by file."""

  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  by_file: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(collections.Counter))
  rows: list = dataclasses.field(default_factory=list)
  converted_to_rgb: int = 0
  rows_read: int = 0

  def add(self, file: str, row: int, reason: str, detail: str = "") -> None:
    self.counts[reason] += 1
    self.by_file[file][reason] += 1
    if sum(1 for r in self.rows if r["reason"] == reason) < _MAX_LISTED_SKIPS:
      self.rows.append({"file": file, "row": row, "reason": reason, "detail": detail})

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def to_dict(self) -> dict[str, Any]:
    return {
        "rows_read": self.rows_read,
        "skipped": self.total,
        "skipped_by_reason": dict(self.counts),
        "skipped_by_file": {f: dict(c) for f, c in sorted(self.by_file.items())},
        "converted_to_rgb": self.converted_to_rgb,
        "examples": self.rows,
    }

  def summary(self) -> str:
    """A few human-readable lines: totals, reasons, files."""
    lines = [
        f"rows read: {self.rows_read}; skipped: {self.total}; "
        f"re-encoded as RGB: {self.converted_to_rgb}"
    ]
    for reason, count in self.counts.most_common():
      files = sorted(f for f, c in self.by_file.items() if c[reason])
      shown = ", ".join(files[:5]) + (f", ... ({len(files)} files)" if len(files) > 5 else "")
      lines.append(f"  {count} x {reason}  [{shown}]")
    return "\n".join(lines)


def normalize_category(value: Any) -> str | None:
  """`' Background_Change'` -> `'background change'`; None when the value is not a known type."""
  if not isinstance(value, str):
    return None
  name = " ".join(value.strip().lower().replace("_", " ").replace("-", " ").split())
  return name if name in EDIT_CATEGORIES else None


def find_shards(manual_dir: os.PathLike | str) -> list[str]:
  """Sorted parquet files under `<manual_dir>/data/` or, failing that, directly in `manual_dir`."""
  root = os.fspath(manual_dir)
  for folder in (os.path.join(root, "data"), root):
    if os.path.isdir(folder):
      files = sorted(
          os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".parquet")
      )
      if files:
        return files
  raise FileNotFoundError(
      f"No parquet shards found in {root}/data/ or {root}/. "
      + MANUAL_DOWNLOAD_INSTRUCTIONS
  )


def _check_image_column(schema, name: str, path: str) -> None:
  import pyarrow as pa  # pylint: disable=g-import-not-at-top

  field = schema.field(name)
  expected = "struct<bytes: binary, path: string>"
  if not pa.types.is_struct(field.type):
    raise CrispEditSchemaError(
        f"{path}: column '{name}' has type {field.type}, expected {expected}."
    )
  sub = {field.type.field(i).name: field.type.field(i).type for i in range(field.type.num_fields)}
  if "bytes" not in sub or not (pa.types.is_binary(sub["bytes"]) or pa.types.is_large_binary(sub["bytes"])):
    raise CrispEditSchemaError(
        f"{path}: column '{name}' field 'bytes' is {sub.get('bytes', 'missing')}, "
        f"expected binary ({expected})."
    )
  path_type = sub.get("path")
  if path_type is None or not (
      pa.types.is_string(path_type) or pa.types.is_large_string(path_type) or pa.types.is_null(path_type)
  ):
    raise CrispEditSchemaError(
        f"{path}: column '{name}' field 'path' is {path_type or 'missing'}, "
        f"expected string ({expected})."
    )


def validate_shard(path: str) -> int:
  """Checks one shard's schema and `type` values; returns its row count.

  Reads the parquet footer and the (small) `type` column only.

  Raises:
    CrispEditSchemaError: naming the file and the offending column, or the row and value.
  """
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  try:
    pf = pq.ParquetFile(path)
  except Exception as e:  # pylint: disable=broad-except
    raise CrispEditSchemaError(f"{path}: not a readable parquet file ({e}).") from e
  schema = pf.schema_arrow
  for name in REQUIRED_COLUMNS:
    if name not in schema.names:
      raise CrispEditSchemaError(
          f"{path}: column '{name}' is missing (columns present: {', '.join(schema.names)})."
      )
  _check_image_column(schema, "input_img", path)
  _check_image_column(schema, "output_img", path)
  for name in ("instruction", "type"):
    t = schema.field(name).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
      raise CrispEditSchemaError(f"{path}: column '{name}' has type {t}, expected string.")
  types = pf.read(columns=["type"]).column("type").to_pylist()
  for row, value in enumerate(types):
    if normalize_category(value) is None:
      raise CrispEditSchemaError(
          f"{path}: row {row} column 'type' has value {value!r}, expected one of "
          f"{', '.join(EDIT_CATEGORIES)}."
      )
  return pf.metadata.num_rows


def is_held_out(file_name: str, row_group: int, fraction: float, seed: int) -> bool:
  """Deterministic membership of a row group in the held-out split."""
  if fraction <= 0:
    return False
  h = zlib.crc32(f"{seed}:{file_name}:{row_group}".encode())
  return h / 2**32 < fraction


def check_image(data: bytes | None, min_size: int) -> tuple[bytes | None, bool, str]:
  """Decodes `data` with PIL to prove it is an image.

  Returns:
    (bytes to store or None when unusable, whether it was re-encoded as RGB PNG, failure reason).
  """
  if not data:
    return None, False, "missing bytes"
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.draft("RGB", (min_size, min_size))  # JPEG only: decode at reduced scale, still reads all data
      im.load()
      mode = im.mode
    if mode == "RGB":
      return data, False, ""
    with Image.open(io.BytesIO(data)) as im:
      rgb = im.convert("RGB")
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return out.getvalue(), True, ""
  except Exception as e:  # pylint: disable=broad-except  (any PIL failure means "undecodable")
    message = str(e).replace(" <_io.BytesIO object", "").split(" at 0x")[0]
    return None, False, f"{type(e).__name__}: {message}"
