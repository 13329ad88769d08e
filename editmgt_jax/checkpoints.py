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

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping

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
               *, metadata: Mapping | None = None, overwrite: bool = False,
               finish: Callable[[str], None] | None = None) -> str:
    """Write ``params[name]`` (nested dicts of arrays) and ``configs[name]`` (dicts) to ``path``.

    Written atomically (see ``writing_checkpoint``): ``path`` appears complete or not at all.
    ``finish(folder)`` adds further files (tokenizers, ...) before the folder becomes ``path``.
    """
    with writing_checkpoint(path, overwrite=overwrite) as tmp:
        for name, tree in params.items():
            save_component(tmp, name, tree)
        write_config(tmp, configs, metadata)
        if finish is not None:
            finish(tmp)
    return os.path.abspath(os.fspath(path))


def is_model_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a ``config.json`` of this format."""
    try:
        read_config(path)
    except CheckpointError:
        return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_replaceable(path: str | os.PathLike, *, overwrite: bool = False,
                      flag: str = "overwrite=True / --overwrite") -> None:
    """Raise ``CheckpointError`` unless a model checkpoint may be written at ``path``: it does not
    exist, or ``overwrite`` is set and it is a model checkpoint of this format."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        if not overwrite:
            raise CheckpointError(f"{path}: already exists (pass {flag})")
        if not is_model_checkpoint(path):
            raise CheckpointError(f"{path}: exists and is not a model checkpoint (no config.json of "
                                  f"format {FORMAT!r}); not replacing it, choose another folder")


@contextlib.contextmanager
def writing_checkpoint(path: str | os.PathLike, *, overwrite: bool = False,
                       flag: str = "overwrite=True / --overwrite") -> Iterator[str]:
    """Yield a temporary sibling folder of ``path`` to write a model checkpoint into; on success it
    is renamed to ``path``, on any error (or a kill) ``path`` is left as it was.

    An existing ``path`` is refused unless ``overwrite``; even then only a model checkpoint of this
    format is replaced (a folder holding anything else is never deleted). Temporary folders left by
    killed writers (``.NAME.tmp-PID``) are removed.
    """
    path = os.path.abspath(os.fspath(path))
    parent, base = os.path.split(path)
    check_replaceable(path, overwrite=overwrite, flag=flag)
    os.makedirs(parent, exist_ok=True)
    prefix = f".{base}.tmp-"
    for name in os.listdir(parent):
        if name.startswith(prefix) and name[len(prefix):].isdigit() and not _pid_alive(int(name[len(prefix):])):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    tmp = os.path.join(parent, f"{prefix}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "params"))
    try:
        yield tmp
        if os.path.exists(path):
            old = os.path.join(parent, f".{base}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_component(path: str, name: str, tree: Mapping) -> None:
    ckptr = _checkpointer()
    ckptr.save(os.path.join(os.path.abspath(path), "params", name), dict(tree))
    ckptr.wait_until_finished()


def write_config(path: str, configs: Mapping[str, Mapping], metadata: Mapping | None = None) -> None:
    doc = {"format": FORMAT, "version": VERSION, "components": {k: dict(v) for k, v in configs.items()}}
    doc.update(metadata or {})
    tmp = os.path.join(path, "config.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=2, sort_keys=True, default=_json_default)
    os.replace(tmp, os.path.join(path, "config.json"))


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (tuple, np.ndarray)):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def read_config(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    f = os.path.join(path, "config.json")
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
    try:
        if abstract is None:
            return ckptr.restore(item)
        stored = _metadata_quietly(ckptr, item)
        stored_tree = getattr(stored, "item_metadata", stored)
        stored_tree = getattr(stored_tree, "tree", stored_tree)
        if not stored_tree:
            raise CheckpointError(f"{item}: the parameter index (manifest.ocdbt / _METADATA) is empty or "
                                  f"unreadable; the checkpoint is damaged or incomplete")
        _check_shapes(name, path, stored_tree, abstract)
        if shardings is not None:
            target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract, shardings)
        else:
            target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract)
        return ckptr.restore(item, target)
    except CheckpointError:
        raise
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        _quiet_orphaned_reads()
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{item}: parameters cannot be read, a file is damaged, truncated or missing "
                              f"({first[:200]})") from None


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


def _quiet_orphaned_reads() -> None:
    """After a failed restore, reads still in flight complete on an event loop that Orbax has
    closed and each would print an 'Event loop is closed' traceback; those carry no information
    beyond the error already raised, so they are dropped (every other unraisable error still prints)."""
    import sys

    previous = sys.unraisablehook
    if getattr(previous, "_drops_closed_loop", False):
        return

    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook._drops_closed_loop = True
    sys.unraisablehook = hook


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
