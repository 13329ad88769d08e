"""Writing and reading a model checkpoint folder: atomic writes, one Orbax item per component.

Components are stored separately (``params/<name>``) so a large model converts and loads one
component at a time. Training checkpoints (``editmgt_jax.training.checkpoint``) hold optimizer state
and the data iterator as well; a model checkpoint can be exported from them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from editmgt_jax.checkpoints.conventions import Conventions, read_conventions
from editmgt_jax.checkpoints.index import PARTS_FILE, _checkpointer, _flat, _merge_into, _stored_tree
from editmgt_jax.checkpoints.layout import (FORMAT, TOKENIZER_DIRS, VERSION, CheckpointError, dump_config,
                                            is_model_checkpoint, params_dir, read_config)
from editmgt_jax.folders import writing_folder


# ---------------------------------------------------------------------------------------------
# Writing


def save_model(path: str | os.PathLike, params: Mapping[str, Mapping], configs: Mapping[str, Mapping],
               *, metadata: Mapping | None = None, conventions: Conventions | None = None,
               overwrite: bool = False, finish: Callable[[str], None] | None = None) -> str:
    """Write ``params[name]`` (nested dicts of arrays) and ``configs[name]`` (dicts) to ``path``.

    Written atomically (see ``writing_checkpoint``): ``path`` appears complete or not at all.
    ``finish(folder)`` adds further files (tokenizers, ...) before the folder becomes ``path``.
    """
    with writing_checkpoint(path, overwrite=overwrite) as tmp:
        for name, tree in params.items():
            save_component(tmp, name, tree)
        write_config(tmp, configs, metadata, conventions)
        if finish is not None:
            finish(tmp)
    return os.path.abspath(os.fspath(path))


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
    is renamed to ``path``, on any error (or a kill) ``path`` is left as it was
    (:func:`editmgt_jax.folders.writing_folder`).

    An existing ``path`` is refused unless ``overwrite``; even then only a model checkpoint of this
    format is replaced (a folder holding anything else is never deleted).
    """
    check_replaceable(path, overwrite=overwrite, flag=flag)
    with writing_folder(path) as tmp:
        os.makedirs(params_dir(tmp))
        yield tmp


# Bytes in flight while Orbax copies a component's arrays for writing: without a limit it copies
# the whole component first, doubling the peak memory of a conversion.
SAVE_CONCURRENT_GB = 1


def save_component(path: str, name: str, tree: Mapping) -> None:
    """Write one component's parameters (nested dicts of numpy or jax arrays).

    Numpy leaves of mutable dicts are replaced in place, one at a time, by host (CPU) jax arrays, and
    Orbax copies at most :data:`SAVE_CONCURRENT_GB` of them at once, so a component converted in
    host memory is never held twice (peak: the component plus about one tensor)."""
    _save_item(params_dir(os.path.abspath(path), name), tree)


def _save_item(item: str, tree: Mapping) -> None:
    import orbax.checkpoint as ocp

    tree = _host_arrays(tree, jax.devices("cpu")[0])
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(save_device_host_concurrent_gb=SAVE_CONCURRENT_GB))
    ckptr.save(item, args=ocp.args.PyTreeSave(tree))


# A component is written in parts (``params/<name>/part-NNN`` plus ``parts.json``) by writers that
# produce it piece by piece (the release converter for components over PART_BYTES), so that only
# one part is in memory while it is written: Orbax's writer holds up to another copy of whatever
# it is given until the write completes.
PART_BYTES = 1 << 30


def plan_parts(abstract: Mapping, itemsize: int | None = None, max_bytes: int | None = None) -> list[list[tuple]]:
    """Split a component's parameter paths into parts of at most about ``max_bytes`` (a part never
    splits one layer: paths are grouped up to their first integer key, e.g. ``model/layers/3``,
    else by their first two keys), in order.
    ``itemsize`` overrides the abstract dtypes' (the dtype the parts will be written in);
    ``max_bytes`` defaults to :data:`PART_BYTES`."""
    max_bytes = PART_BYTES if max_bytes is None else max_bytes
    groups: dict[tuple, list[tuple]] = {}
    sizes: dict[tuple, int] = {}

    def rec(node, prefix):
        if isinstance(node, Mapping):
            for k, v in node.items():
                rec(v, prefix + (k,))
        else:
            ints = [i for i, k in enumerate(prefix) if isinstance(k, int) or str(k).isdigit()]
            g = prefix[:ints[0] + 1] if ints else prefix[:2]
            groups.setdefault(g, []).append(prefix)
            n = int(np.prod(node.shape)) * (itemsize or np.dtype(node.dtype).itemsize)
            sizes[g] = sizes.get(g, 0) + n

    rec(abstract, ())
    parts: list[list[tuple]] = [[]]
    used = 0
    for g, paths in groups.items():
        if parts[-1] and used + sizes[g] > max_bytes:
            parts.append([])
            used = 0
        parts[-1].extend(paths)
        used += sizes[g]
    return parts


def save_component_part(path: str, name: str, index: int, tree: Mapping) -> None:
    """Write part ``index`` of a component written in parts (see :func:`finish_component_parts`)."""
    _save_item(os.path.join(params_dir(os.path.abspath(path), name), f"part-{index:03d}"), tree)


def finish_component_parts(path: str, name: str, count: int) -> None:
    """Record the ``count`` parts written by :func:`save_component_part`; the component is then read
    like any other by :func:`load_component`."""
    import json

    with open(os.path.join(params_dir(path, name), PARTS_FILE), "w") as fh:
        json.dump({"parts": [f"part-{i:03d}" for i in range(count)]}, fh)


def _host_arrays(tree, device):
    out = tree if isinstance(tree, dict) else dict(tree)
    for k in list(out):
        v = out[k]
        if isinstance(v, Mapping):
            out[k] = _host_arrays(v, device)
        elif isinstance(v, np.ndarray) or np.isscalar(v):
            out[k] = jax.device_put(np.asarray(v), device)
            del v
    return out


def write_config(path: str, configs: Mapping[str, Mapping], metadata: Mapping | None = None,
                 conventions: Conventions | None = None) -> None:
    """Write ``config.json``. A checkpoint with a transformer always gets a conventions record:
    ``conventions`` (or ``metadata["conventions"]``), else one rebuilt from the older fields."""
    doc = {"format": FORMAT, "version": VERSION, "components": {k: dict(v) for k, v in configs.items()}}
    doc.update(metadata or {})
    if conventions is not None:
        doc["conventions"] = conventions.to_dict()
    elif isinstance(doc.get("conventions"), Conventions):
        doc["conventions"] = doc["conventions"].to_dict()
    if "transformer" in doc["components"]:
        doc["conventions"] = read_conventions(doc).to_dict()   # checked against the vocabulary
    dump_config(path, doc)
    from editmgt_jax.checkpoints.card import write_model_card

    write_model_card(path, doc)   # README.md: what the model is, how it was made, its conventions


def add_components(model_dir: str, source: str, names: Sequence[str], *, tokenizers: bool = True) -> None:
    """Copy components ``names`` (parameters and configs) of the model checkpoint ``source`` into the
    model checkpoint ``model_dir`` (replacing those it has), and with ``tokenizers`` the tokenizer
    folders; the files are copied as they are."""
    src_comps = read_config(source)["components"]
    doc = read_config(model_dir)
    comps = dict(doc.pop("components"))
    for key in ("format", "version"):
        doc.pop(key, None)
    for name in names:
        dst = params_dir(model_dir, name)
        if os.path.exists(dst):
            shutil.rmtree(dst)
        shutil.copytree(params_dir(source, name), dst)
        comps[name] = src_comps[name]
    for d in TOKENIZER_DIRS if tokenizers else ():
        shutil.copytree(os.path.join(source, d), os.path.join(model_dir, d), dirs_exist_ok=True)
    write_config(model_dir, comps, doc)


# ---------------------------------------------------------------------------------------------
# Reading


def load_component(path: str | os.PathLike, name: str, abstract: Mapping | None = None,
                   shardings=None) -> dict:
    """Restore one component's parameters.

    ``abstract`` (a tree of ``jax.ShapeDtypeStruct``) checks shapes against the model config and
    places arrays; ``shardings`` (same tree of ``jax.sharding.Sharding``) shards them on restore.
    """
    path = os.path.abspath(os.fspath(path))
    item = params_dir(path, name)
    if not os.path.isdir(item):
        raise CheckpointError(f"{path}: no parameters for component {name!r} (missing {item})")
    ckptr = _checkpointer()
    quiet_orphaned_reads()
    parts_file = os.path.join(item, PARTS_FILE)
    try:
        if os.path.isfile(parts_file):
            import json

            with open(parts_file) as fh:
                items = [os.path.join(item, p) for p in json.load(fh)["parts"]]
        else:
            items = [item]
        if abstract is None:
            out: dict = {}
            for it in items:
                _merge_into(out, ckptr.restore(it))
            return out
        stored_trees = [_stored_tree(ckptr, it) for it in items]
        merged: dict = {}
        for t in stored_trees:
            _merge_into(merged, t)
        _check_shapes(name, path, merged, abstract)
        if shardings is not None:
            target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract, shardings)
        else:
            target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract)
        if len(items) == 1:
            return ckptr.restore(item, target)
        out = {}
        for it, t in zip(items, stored_trees):
            _merge_into(out, ckptr.restore(it, _restrict(target, set(_flat(t)))))
        return out
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001  (TensorStore read failures reach here as plain Exception)
        quiet_orphaned_reads()
        root = e.__cause__ if isinstance(e.__cause__, Exception) else e   # e.g. OUT_OF_RANGE: byte range
        first = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
        raise CheckpointError(f"{item}: parameters cannot be read, a file is damaged, truncated or missing "
                              f"({first[:200]})") from None


def _restrict(tree: Mapping, keep: set, prefix: tuple = ()) -> dict:
    """The sub-tree of ``tree`` whose leaves' ``"/"``-joined paths are in ``keep``."""
    out = {}
    for k, v in tree.items():
        p = prefix + (str(k),)
        if isinstance(v, Mapping):
            sub = _restrict(v, keep, p)
            if sub:
                out[k] = sub
        elif "/".join(p) in keep:
            out[k] = v
    return out


def _orphaned_read_error(exc) -> bool:
    return ((isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed")
            or str(exc).startswith("Encountered error while reading array index"))


class _DropOrphanedReads:
    """A logging filter for asyncio's 'exception was never retrieved' reports of those errors."""

    def filter(self, record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        ctx = record.args if isinstance(record.args, dict) else {}
        exc = exc or ctx.get("exception")
        return not (exc is not None and _orphaned_read_error(exc)) and "Event loop is closed" not in str(record.msg)


def quiet_orphaned_reads() -> None:
    """Reads of a damaged checkpoint still in flight when its restore fails complete on an event
    loop that Orbax has closed, each with an 'Event loop is closed' error, and the other reads of
    the damaged file fail the same way in coroutines nobody awaits any more ('Encountered error
    while reading array index'). Those carry no information beyond the error already raised and
    would print tracebacks after it (from a callback, a thread or asyncio's report of an
    unretrieved exception), so they are dropped on all three paths; every other error still
    prints. Installed before reading (a read can fail the moment the loop closes, before the
    caller's handler runs); idempotent."""
    import logging
    import sys
    import threading

    previous = sys.unraisablehook
    if getattr(previous, "_drops_closed_loop", False):
        return

    def hook(unraisable):
        if _orphaned_read_error(unraisable.exc_value):
            return
        previous(unraisable)

    hook._drops_closed_loop = True
    sys.unraisablehook = hook

    previous_thread_hook = threading.excepthook

    def thread_hook(args):
        if _orphaned_read_error(args.exc_value):
            return
        previous_thread_hook(args)

    threading.excepthook = thread_hook
    logging.getLogger("asyncio").addFilter(_DropOrphanedReads())


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
