"""Datasets and the input pipeline.

Importing this package registers the TFDS builders `crispedit` and `synthetic_edits`, so
`tfds.builder("synthetic_edits/default", data_dir=...)` and `tfds.data_source(...)` find them.
Build them with `python -m train.build_dataset`; read them with `editmgt_jax.data.pipeline`.
"""

from editmgt_jax.data.crispedit import EDIT_CATEGORIES, CrispEdit, CrispEditConfig, CrispEditSchemaError
from editmgt_jax.data.synthetic_edits import SYNTHETIC_VOCAB, SyntheticEdits, SyntheticEditsConfig
from editmgt_jax.data.text import WordTokenizer

__all__ = [
    "EDIT_CATEGORIES",
    "SYNTHETIC_VOCAB",
    "CrispEdit",
    "CrispEditConfig",
    "CrispEditSchemaError",
    "SyntheticEdits",
    "SyntheticEditsConfig",
    "WordTokenizer",
]
