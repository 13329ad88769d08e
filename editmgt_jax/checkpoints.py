"""Model checkpoints on disk: a config JSON plus one Orbax item per component.

Layout of a model checkpoint folder (what the converter writes and the editor loads)::

    CKPT/config.json            {"format": "editmgt-jax/model", "version": 1,
                                 "components": {name: config dict}, ...metadata}
    CKPT/params/<component>/    Orbax PyTree checkpoint of that component's parameters
    CKPT/tokenizer/, CKPT/llm_tokenizer/   tokenizer files copied from the release (optional)

Components are stored separately so a large model converts and loads one component at a time.
Training checkpoints (``editmgt_jax.training.checkpoint``) hold optimizer state and the data
iterator as well; a model checkpoint can be exported from them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping

import jax
import numpy as np

FORMAT = "editmgt-jax/model"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, or made for another configuration."""


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def save_model(path: str | os.PathLike, params: Mapping[str, Mapping], configs: Mapping[str, Mapping],
               *, metadata: Mapping | None = None, overwrite: bool = False) -> str:
    """Write ``params[name]`` (nested dicts of arrays) and ``configs[name]`` (dicts) to ``path``."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        if not overwrite:
            raise CheckpointError(f"{path}: already exists (pass overwrite=True / --overwrite)")
        shutil.rmtree(path)
    os.makedirs(os.path.join(path, "params"))
    for name, tree in params.items():
        save_component(path, name, tree)
    write_config(path, configs, metadata)
    return path


def save_component(path: str, name: str, tree: Mapping) -> None:
    ckptr = _checkpointer()
    ckptr.save(os.path.join(os.path.abspath(path), "params", name), dict(tree))
    ckptr.wait_until_finished()


def write_config(path: str, configs: Mapping[str, Mapping], metadata: Mapping | None = None) -> None:
    doc = {"format": FORMAT, "version": VERSION, "components": {k: dict(v) for k, v in configs.items()}}
    doc.update(metadata or {})
    tmp = os.path.join(path, "config.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=2, sort_keys=True, default=json_default)
    os.replace(tmp, os.path.join(path, "config.json"))


def json_default(x):
    """``json.dump(default=...)`` for config values: NumPy scalars, tuples, sets and arrays."""
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, (tuple, set, np.ndarray)):
        return list(x)
    raise TypeError(f"value of type {type(x).__name__} is not JSON serialisable")


def read_config(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    f = os.path.join(path, "config.json")
    if not os.path.isfile(f):
        raise CheckpointError(f"{path}: not a model checkpoint (no config.json)")
    with open(f) as fh:
        doc = json.load(fh)
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{f}: format {doc.get('format')!r}, expected {FORMAT!r}")
    return doc


def load_component(path: str | os.PathLike, name: str, abstract: Mapping | None = None,
                   shardings=None) -> dict:
    """Restore one component's parameters.

    ``abstract`` (a tree of ``jax.ShapeDtypeStruct``) checks shapes against the model config and
    places arrays; ``shardings`` (same tree of ``jax.sharding.Sharding``) shards them on restore.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    item = os.path.join(path, "params", name)
    if not os.path.isdir(item):
        raise CheckpointError(f"{path}: no parameters for component {name!r} (missing {item})")
    ckptr = _checkpointer()
    if abstract is None:
        return ckptr.restore(item)
    stored = ckptr.metadata(item)
    stored_tree = getattr(stored, "item_metadata", stored)
    stored_tree = getattr(stored_tree, "tree", stored_tree)
    _check_shapes(name, path, stored_tree, abstract)
    if shardings is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract, shardings)
    else:
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract)
    return ckptr.restore(item, target)


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


def _check_shapes(name: str, path: str, stored, abstract) -> None:
    s, a = _flat(stored), _flat(abstract)
    problems = []
    missing = sorted(set(a) - set(s))
    extra = sorted(set(s) - set(a))
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing[:10])}")
    if extra:
        problems.append(f"unexpected {len(extra)}: {', '.join(extra[:10])}")
    for k in sorted(set(a) & set(s)):
        ss = tuple(getattr(s[k], "shape", ()))
        if ss != tuple(a[k].shape):
            problems.append(f"{k}: stored {ss}, config expects {tuple(a[k].shape)}")
    if problems:
        raise CheckpointError(f"{path}: component {name!r} was saved for another configuration: "
                              + "; ".join(problems[:12]))
