"""Converting whole release folders and reference-fixture folders."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from editmgt_jax import checkpoints
from editmgt_jax.convert.core import ConversionError, TensorSource
from editmgt_jax.convert.registry import (COMPONENTS, Component, abstract_params, config_from_official,
                                          convert_component, find_release_dir, read_json)

# Tokenizer files worth carrying into a converted checkpoint, and the release folders they come from
# for each of the checkpoint's tokenizer folders (CLIP's, then Gemma-2's; the first that has them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json")
TOKENIZER_DIRS = dict(zip(checkpoints.TOKENIZER_DIRS,
                          (("tokenizer", "text_encoder"), ("llm_tokenizer", "llm_encoder"))))


def _log(msg: str) -> None:
    print(msg, flush=True)


def convert_release(official_dir: str, out_dir: str, *, components: Sequence[str] | None = None,
                    dtype=np.float32, overwrite: bool = False,
                    log: Callable[[str], None] = _log) -> str:
    """Convert a release folder (``vqvae/``, ``editmgt/`` or ``transformer/``, ``text_encoder/``,
    ``llm_encoder/``, ``tokenizer/``, ``scheduler/``) into a model checkpoint at ``out_dir``.

    Components are converted and written one at a time, so peak memory is one component. The
    release's conventions (:func:`editmgt_jax.checkpoints.release_conventions`: the mask id from
    ``scheduler/scheduler_config.json``, else ``vocab_size - 1``) go into the checkpoint's
    ``config.json``.
    """
    from tqdm import tqdm

    _free_large_buffers_promptly()
    official_dir = os.fspath(official_dir)
    if not os.path.isdir(official_dir):
        raise ConversionError(f"--official {official_dir}: not a directory")
    names = list(components) if components else list(COMPONENTS)
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown:
        raise ConversionError(f"unknown component(s) {unknown}; choose from {list(COMPONENTS)}")
    found: dict[str, str] = {}
    for n in names:
        comp = COMPONENTS[n]
        d = find_release_dir(official_dir, comp)
        if d is None:
            if comp.required or components:
                raise ConversionError(f"{official_dir}: no {'/ or '.join(comp.release_dirs)}/ folder for the "
                                      f"{n} component")
            log(f"[convert] {n}: no {'/'.join(comp.release_dirs)}/ folder, skipped")
            continue
        found[n] = d
    conventions = None
    if "transformer" in found:   # read (and checked) before anything is written
        tcfg = read_json(os.path.join(found["transformer"], "config.json"))
        try:
            conventions = checkpoints.release_conventions(official_dir, {**_TRANSFORMER_DEFAULTS, **tcfg})
        except checkpoints.CheckpointError as e:
            raise ConversionError(str(e)) from None
        log(f"[convert] mask token id {conventions.mask_token_id} (from {conventions.source})")
    out_dir = os.path.abspath(os.fspath(out_dir))
    # Written into a temporary sibling and renamed when complete: a failed or killed conversion
    # leaves --out as it was, and --overwrite replaces only a model checkpoint.
    try:
        checkpoints.check_replaceable(out_dir, overwrite=overwrite, flag="--overwrite")
    except checkpoints.CheckpointError as e:
        raise ConversionError(f"--out {e}") from None
    with checkpoints.writing_checkpoint(out_dir, overwrite=overwrite) as tmp:
        configs, official = {}, {}
        for n, d in found.items():
            comp = COMPONENTS[n]
            official[n] = read_json(os.path.join(d, "config.json"))
            cfg = config_from_official(comp, official[n], d)
            source = TensorSource.from_dir(d)
            bar = tqdm(total=len(source), desc=f"convert {n}", unit="tensor", leave=False)
            # A component over two parts' worth is converted and written one part at a time (see
            # checkpoints.PART_BYTES), so the converter holds one part, not the whole component.
            parts = checkpoints.plan_parts(abstract_params(comp, cfg), np.dtype(dtype).itemsize)
            if len(parts) <= 2:
                parts = [None]
            count = 0
            for i, part in enumerate(parts):
                select = None if part is None else set(part).__contains__
                params = convert_component(comp, cfg, source, dtype=dtype, progress=lambda _k: bar.update(),
                                           select=select)
                count += sum(int(np.prod(x.shape)) for x in _leaves(params))
                if part is None:
                    checkpoints.save_component(tmp, n, params)
                else:
                    checkpoints.save_component_part(tmp, n, i, params)
                del params
                _release_freed_memory()
            if parts[0] is not None:
                checkpoints.finish_component_parts(tmp, n, len(parts))
            bar.close()
            configs[n] = cfg.to_dict()
            log(f"[convert] {n}: {len(source)} tensors from {d}, {count:,} parameters"
                + (f", written in {len(parts)} parts" if parts[0] is not None else ""))
        for dest, srcs in TOKENIZER_DIRS.items():
            for s in srcs:
                src = os.path.join(official_dir, s)
                files = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]
                if files:
                    checkpoints.copy_tokenizer_files(tmp, dest, src, files)
                    log(f"[convert] {dest}: {len(files)} file(s) from {src}")
                    break
        sched = os.path.join(official_dir, checkpoints.SCHEDULER_CONFIG)
        if conventions is not None and os.path.isfile(sched):
            official["scheduler"] = read_json(sched)
        # The release's own configs, so an export writes back the fields our configs do not model.
        checkpoints.write_config(tmp, configs, {"source": os.path.abspath(official_dir),
                                                "timestep_convention": "step_index",
                                                "official_configs": official},
                                 conventions=conventions)
    log(f"[convert] wrote {out_dir}")
    return out_dir


def _free_large_buffers_promptly() -> None:
    """Give every buffer of 1 MiB or more its own mapping (glibc ``M_MMAP_THRESHOLD``), so a tensor
    freed during the conversion (a read tensor once converted, a converted one once handed to the
    writer) returns its memory to the system at once. With glibc's default, which raises the
    threshold to 32 MiB after the first large free, most tensors of a component landed in the heap and
    stayed resident after they were freed. (This alone did not bound a conversion: Gemma-2-2B in
    float32 still peaked at 17.4 GiB until components were written in parts.) The setting stays for
    the rest of the process. Not glibc: nothing to set."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)   # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError):
        pass


def _release_freed_memory() -> None:
    """Hand the memory of a written component back to the system before the next one: its many
    small tensors were freed into the allocator's heap, which otherwise keeps them resident."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to trim
        pass


# vocab_size / codebook_size of an official transformer config.json that leaves them out.
_TRANSFORMER_DEFAULTS = {"vocab_size": 8256, "codebook_size": 8192}


def fixture_conventions(fixture_dir: str) -> "checkpoints.Conventions":
    """The conventions of a reference-fixture folder, read as from a release: the mask id from
    ``scheduler_config.json`` in the folder when present, else ``vocab_size - 1`` of
    ``transformer_config.json``."""
    tcfg = read_json(os.path.join(fixture_dir, f"{COMPONENTS['transformer'].fixture_prefix}_config.json"))
    try:
        return checkpoints.release_conventions(fixture_dir, {**_TRANSFORMER_DEFAULTS, **tcfg},
                                               scheduler_config="scheduler_config.json")
    except checkpoints.CheckpointError as e:
        raise ConversionError(str(e)) from None


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def load_fixture_component(fixture_dir: str, component: Component | str):
    """Convert one component of a reference-fixture folder (``<prefix>_config.json`` and
    ``<prefix>.safetensors``). Returns ``(config, params)`` or ``None`` if the folder lacks it."""
    comp = COMPONENTS[component] if isinstance(component, str) else component
    cfg_path = os.path.join(fixture_dir, f"{comp.fixture_prefix}_config.json")
    st_path = os.path.join(fixture_dir, f"{comp.fixture_prefix}.safetensors")
    if not (os.path.isfile(cfg_path) and os.path.isfile(st_path)):
        return None
    cfg = config_from_official(comp, read_json(cfg_path), cfg_path)
    return cfg, convert_component(comp, cfg, TensorSource([st_path]))
