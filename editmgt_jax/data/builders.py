"""The project's TFDS builders, by name.

TFDS registers a builder class when the class is defined, so `tfds.builder("synthetic_edits/...")`
finds the name only once its module is imported. `register_builders()` does that, where a builder
is needed (`sources.tfds_source`); `train.build_dataset` instantiates the classes directly.
"""

from __future__ import annotations


def register_builders() -> dict[str, type]:
  """Imports (so registers) the `crispedit` and `synthetic_edits` builders; returns them by name."""
  # pylint: disable=g-import-not-at-top
  from editmgt_jax.data.crispedit import CrispEdit
  from editmgt_jax.data.synthetic_edits.builder import SyntheticEdits

  return {builder.name: builder for builder in (CrispEdit, SyntheticEdits)}
