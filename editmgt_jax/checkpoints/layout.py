"""Names and paths of a model checkpoint folder, its ``config.json``, and its tokenizer folders.

    CKPT/config.json            {"format": "editmgt-jax/model", "version": 1,
                                 "components": {name: config dict}, "conventions": {...}, ...metadata}
    CKPT/params/<component>/    Orbax PyTree checkpoint of that component's parameters
    CKPT/vocab.txt              the small text encoder's word tokenizer (models with ``small_text``)
    CKPT/tokenizer/, CKPT/llm_tokenizer/   tokenizer files copied from the release (``clip`` + ``gemma``)
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable

import numpy as np

FORMAT = "editmgt-jax/model"
VERSION = 1

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
WORD_VOCAB_FILE = "vocab.txt"                      # the small text encoder's word tokenizer
TOKENIZER_DIRS = ("tokenizer", "llm_tokenizer")    # the release's CLIP and Gemma-2 tokenizer files
SMALL_TEXT = "small_text"                          # component name of the small text encoder


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, or made for another configuration."""


def config_path(path: str | os.PathLike) -> str:
    """``path/config.json``."""
    return os.path.join(os.fspath(path), CONFIG_FILE)


def has_config(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a ``config.json`` (of any format: :func:`read_config` checks it)."""
    return os.path.isfile(config_path(path))


def params_dir(path: str | os.PathLike, name: str | None = None) -> str:
    """``path/params`` or, with ``name``, the Orbax item of that component (``path/params/<name>``)."""
    d = os.path.join(os.fspath(path), PARAMS_DIR)
    return d if name is None else os.path.join(d, name)


def read_config(path: str | os.PathLike) -> dict:
    """The ``config.json`` of the model checkpoint at ``path`` (``CheckpointError`` unless it is one)."""
    path = os.fspath(path)
    f = config_path(path)
    if not os.path.isfile(f):
        raise CheckpointError(f"{path}: not a model checkpoint (no config.json)")
    try:
        with open(f) as fh:
            doc = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e}); the checkpoint is damaged") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        doc = doc if isinstance(doc, dict) else {}
        raise CheckpointError(f"{f}: format {doc.get('format')!r}, expected {FORMAT!r}")
    return doc


def is_model_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a ``config.json`` of this format."""
    try:
        read_config(path)
    except CheckpointError:
        return False
    return True


def json_default(x):
    """``json.dump(default=...)`` for config values: NumPy scalars, tuples, sets and arrays."""
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, (tuple, set, np.ndarray)):
        return list(x)
    raise TypeError(f"value of type {type(x).__name__} is not JSON serialisable")


def dump_config(path: str, doc: dict) -> None:
    """Write ``doc`` as ``path/config.json`` (through a temporary file: never half written)."""
    tmp = config_path(path) + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=2, sort_keys=True, default=json_default)
    os.replace(tmp, config_path(path))


# ---------------------------------------------------------------------------------------------
# Tokenizer folders


def release_tokenizer(path: str | os.PathLike):
    """The ``PromptTokenizer`` of a checkpoint with ``clip`` + ``gemma`` components (its
    ``tokenizer/`` and ``llm_tokenizer/`` folders)."""
    from editmgt_jax.models.text.tokenize import PromptTokenizer

    tok_dir, llm_dir = (os.path.join(os.fspath(path), d) for d in TOKENIZER_DIRS)
    if not (os.path.isdir(tok_dir) and os.path.isdir(llm_dir)):
        raise CheckpointError(
            f"{path}: the text encoders need tokenizer files in tokenizer/ and llm_tokenizer/ "
            f"(the converter copies them from the release's tokenizer/ and llm_encoder/ folders)")
    return PromptTokenizer.from_dirs(tok_dir, llm_dir)


def word_tokenizer(path: str | os.PathLike):
    """The small text encoder's word tokenizer (``vocab.txt``)."""
    from editmgt_jax.models.text.word_tokenizer import WordTokenizer

    vocab = os.path.join(os.fspath(path), WORD_VOCAB_FILE)
    try:
        return WordTokenizer.load(vocab)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{vocab}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                              "the checkpoint's word list is damaged") from None
    except OSError as e:
        raise CheckpointError(f"{vocab}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def save_word_tokenizer(path: str | os.PathLike, tokenizer) -> None:
    """Write the small text encoder's word tokenizer into the checkpoint folder ``path``."""
    tokenizer.save(os.path.join(os.fspath(path), WORD_VOCAB_FILE))


def copy_tokenizer_files(folder: str, dest: str, src: str, files: Iterable[str]) -> None:
    """Copy ``files`` of the folder ``src`` into the tokenizer folder ``dest`` (one of
    :data:`TOKENIZER_DIRS`) of the checkpoint being written at ``folder``."""
    if dest not in TOKENIZER_DIRS:
        raise ValueError(f"{dest!r} is not a tokenizer folder of a model checkpoint ({TOKENIZER_DIRS})")
    os.makedirs(os.path.join(folder, dest), exist_ok=True)
    for f in files:
        shutil.copy2(os.path.join(src, f), os.path.join(folder, dest, f))
