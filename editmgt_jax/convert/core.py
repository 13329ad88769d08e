"""Generic machinery for official (PyTorch layout) -> Flax NNX weight conversion.

A component's conversion is a declarative list of :class:`Rule` s: a regular expression over the
official key, the target path in our NNX state (``/``-separated, numeric segments are list indices,
``\\1``-style group references allowed) and a layout transform. :func:`convert_tensors` applies the
rules to a lazily read tensor source and checks the result against the abstract state of our module:
every official key must be mapped, every parameter filled, every shape right; otherwise one
:class:`ConversionError` lists all problems.

Tensors are read one at a time from safetensors files (no PyTorch), so peak memory is the converted
model plus one tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np


class ConversionError(ValueError):
    """Raised when an official checkpoint does not match our model; the message lists every problem."""


# ----------------------------------------------------------------------------- layout transforms
def identity(w: np.ndarray) -> np.ndarray:
    return w


def linear(w: np.ndarray) -> np.ndarray:
    """torch ``nn.Linear`` weight [out, in] -> Flax kernel [in, out]."""
    return np.ascontiguousarray(w.T)


def conv(w: np.ndarray) -> np.ndarray:
    """torch ``nn.Conv2d`` weight [out, in, kh, kw] -> Flax kernel [kh, kw, in, out]."""
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def conv_transpose(w: np.ndarray) -> np.ndarray:
    """torch ``nn.ConvTranspose2d`` weight [in, out, kh, kw] -> kernel [kh, kw, in, out].

    The kernel is used as-is by :func:`editmgt_jax.models.layers`-style transposed convolutions that
    scatter each input pixel through the kernel (torch semantics); no spatial flip is applied here.
    """
    return np.ascontiguousarray(w.transpose(2, 3, 0, 1))


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": identity, "linear": linear, "conv": conv, "conv_transpose": conv_transpose,
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """Map official keys matching ``source`` (full match) to ``target`` with ``transform``.

    ``target=None`` marks keys that are known and intentionally not used (e.g. buffers).
    """

    source: str
    target: str | None
    transform: Callable[[np.ndarray], np.ndarray] = identity

    def match(self, key: str) -> str | None | bool:
        m = re.fullmatch(self.source, key)
        if m is None:
            return False
        return None if self.target is None else m.expand(self.target)


# ----------------------------------------------------------------------------- tensor sources
class TensorSource(Mapping):
    """Lazy read-only mapping ``official key -> np.ndarray`` over one or more safetensors files."""

    def __init__(self, files: Sequence[str | os.PathLike]):
        from safetensors import safe_open

        if not files:
            raise ConversionError("no safetensors files given")
        self._where: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            f = os.fspath(f)
            if not os.path.exists(f):
                raise ConversionError(f"{f}: file not found")
            try:
                with safe_open(f, framework="np") as h:
                    for k in h.keys():
                        self._where[k] = f
                        self._shapes[k] = tuple(h.get_slice(k).get_shape())
            except ConversionError:
                raise
            except Exception as e:  # noqa: BLE001 - any parse failure names the file
                raise ConversionError(f"{f}: not a readable safetensors file ({e})") from e
        self.files = [os.fspath(f) for f in files]

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, prefer: Sequence[str] = ()) -> "TensorSource":
        """All weights of a diffusers/transformers folder, sharded (with an index file) or not."""
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise ConversionError(f"{directory}: not a directory")
        names = sorted(os.listdir(directory))
        for idx in [n for n in names if n.endswith(".safetensors.index.json")]:
            with open(os.path.join(directory, idx)) as fh:
                weight_map = json.load(fh).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{directory}/{idx}: no 'weight_map' in index file")
            shards = sorted(set(weight_map.values()))
            return cls([os.path.join(directory, s) for s in shards])
        files = [n for n in names if n.endswith(".safetensors")]
        for p in prefer:
            if p in files:
                return cls([os.path.join(directory, p)])
        if not files:
            raise ConversionError(f"{directory}: no *.safetensors weights found")
        return cls([os.path.join(directory, n) for n in files])

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def __getitem__(self, key: str) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(self._where[key], framework="np") as h:
            return h.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


# ----------------------------------------------------------------------------- conversion
def _split_path(path: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in path.split("/"))


def flatten_abstract(tree) -> dict[tuple, object]:
    """Flatten a nested dict (e.g. ``nnx.State.to_pure_dict()``) of arrays/ShapeDtypeStructs by path."""
    out = {}

    def rec(node, prefix):
        if isinstance(node, Mapping):
            for k, v in node.items():
                rec(v, prefix + (k,))
        else:
            out[prefix] = node

    rec(tree, ())
    return out


def unflatten(flat: Mapping[tuple, object]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = v
    return out


def _fmt(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def convert_tensors(source: Mapping[str, np.ndarray], rules: Sequence[Rule], abstract: Mapping,
                    *, component: str = "model", dtype=np.float32,
                    progress: Callable[[str], None] | None = None,
                    select: Callable[[tuple], bool] | None = None) -> dict:
    """Convert ``source`` into a nested dict matching ``abstract`` (a pure-dict abstract state).

    ``select(path)``: convert only the parameters whose path it accepts (the others are neither
    read nor reported missing), so a large component converts in parts.
    Raises :class:`ConversionError` naming every unmapped official key, every parameter left
    unfilled, every shape mismatch and every parameter filled twice.
    """
    everything = flatten_abstract(abstract)
    want = everything if select is None else {p: v for p, v in everything.items() if select(p)}
    got: dict[tuple, np.ndarray] = {}
    origin: dict[tuple, str] = {}
    unmapped, wrong_shape, twice, bad_target = [], [], [], []
    shape_of = getattr(source, "shape", None)
    for key in source:
        target = False
        transform = identity
        for rule in rules:
            t = rule.match(key)
            if t is not False:
                target, transform = t, rule.transform
                break
        if target is False:
            unmapped.append(key)
            continue
        if target is None:
            continue
        path = _split_path(target)
        if path not in everything:
            bad_target.append(f"{key} -> {target}")
            continue
        if path not in want:    # another part's
            continue
        if path in got:
            twice.append(f"{target} (from {origin[path]} and {key})")
            continue
        expected = tuple(want[path].shape)
        if shape_of is not None:
            # Check the stored shape before reading the tensor.
            src_shape = tuple(shape_of(key))
            probe = transform(np.empty(src_shape, dtype=np.uint8)) if src_shape else np.empty(())
            if tuple(probe.shape) != expected:
                wrong_shape.append(f"{key}: official {src_shape} -> {tuple(probe.shape)}, "
                                   f"our {target} expects {expected}")
                continue
        value = np.asarray(transform(np.asarray(source[key])), dtype=dtype)
        if tuple(value.shape) != expected:
            wrong_shape.append(f"{key}: -> {tuple(value.shape)}, our {target} expects {expected}")
            continue
        got[path] = value
        origin[path] = key
        if progress:
            progress(key)
    missing = [_fmt(p) for p in want if p not in got]
    problems = []
    if unmapped:
        problems.append(f"{len(unmapped)} official key(s) not mapped by any rule: " + ", ".join(sorted(unmapped)))
    if bad_target:
        problems.append(f"{len(bad_target)} rule target(s) not in our model: " + ", ".join(sorted(bad_target)))
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} tensor(s) of the wrong shape: " + "; ".join(sorted(wrong_shape)))
    if twice:
        problems.append(f"{len(twice)} parameter(s) filled twice: " + "; ".join(sorted(twice)))
    if missing:
        problems.append(f"{len(missing)} parameter(s) of our model missing from the checkpoint "
                        f"(renamed or absent official keys?): " + ", ".join(sorted(missing)))
    if problems:
        raise ConversionError(f"{component}: checkpoint does not match the model config:\n  - "
                              + "\n  - ".join(problems))
    return unflatten(got)
