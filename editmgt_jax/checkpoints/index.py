"""A model checkpoint component's stored index: its tree of array metadata (shape, dtype) read
without reading any array, parts merged. The writer and reader (``io``) and the model card
(``card``) both read it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from editmgt_jax.checkpoints.layout import CheckpointError, params_dir

PARTS_FILE = "parts.json"   # a component stored in parts: their item names, in params/<name>/


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def component_shapes(path: str | os.PathLike, name: str) -> dict:
    """The stored tree of component ``name`` (array metadata with ``.shape`` and ``.dtype``; parts
    merged), read from its index without reading any array."""
    item = params_dir(os.path.abspath(os.fspath(path)), name)
    parts_file = os.path.join(item, PARTS_FILE)
    items = [item]
    if os.path.isfile(parts_file):
        import json

        with open(parts_file) as fh:
            items = [os.path.join(item, p) for p in json.load(fh)["parts"]]
    ckptr = _checkpointer()
    merged: dict = {}
    for it in items:
        _merge_into(merged, _stored_tree(ckptr, it))
    return merged


def _stored_tree(ckptr, item) -> Mapping:
    stored = _metadata_quietly(ckptr, item)
    stored_tree = getattr(stored, "item_metadata", stored)
    stored_tree = getattr(stored_tree, "tree", stored_tree)
    if not stored_tree:
        raise CheckpointError(f"{item}: the parameter index (manifest.ocdbt / _METADATA) is empty or "
                              f"unreadable; the checkpoint is damaged or incomplete")
    return stored_tree


def _merge_into(out: dict, tree: Mapping) -> None:
    """Merge ``tree`` into ``out`` (new dicts all the way down: ``tree`` is never aliased)."""
    for k, v in tree.items():
        if isinstance(v, Mapping):
            if not isinstance(out.get(k), dict):
                out[k] = {}
            _merge_into(out[k], v)
        else:
            out[k] = v


def _metadata_quietly(ckptr, item):
    """Orbax logs a warning and returns no tree when the index is unreadable; the caller reports it."""
    import logging

    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return ckptr.metadata(item)
    finally:
        log.setLevel(level)


def _flat(tree) -> dict:
    out = {}

    def rec(node, prefix):
        if isinstance(node, Mapping):
            for k, v in node.items():
                rec(v, prefix + (str(k),))
        else:
            out["/".join(prefix)] = node

    rec(tree, ())
    return out
