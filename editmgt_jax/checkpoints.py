"""Model checkpoints on disk: a config JSON plus one Orbax item per component.

Layout of a model checkpoint folder (what the converter writes and the editor loads)::

    CKPT/config.json            {"format": "editmgt-jax/model", "version": 1,
                                 "components": {name: config dict}, ...metadata}
    CKPT/params/<component>/    Orbax PyTree checkpoint of that component's parameters
    CKPT/tokenizer/, CKPT/llm_tokenizer/   tokenizer files copied from the release (optional)

Components are stored separately so a large model converts and loads one component at a time.
Training checkpoints (``editmgt_jax.training.checkpoint``) hold optimizer state and the data
iterator as well; a model checkpoint can be exported from them.

``config.json`` also carries the model's **conventions** (:class:`Conventions`, key
``"conventions"``): the mask token id, the timestep the transformer was trained for, the
micro-conditions (aesthetic score, crop), the negative prompt, the working resolution and the
recommended sampler settings. This module owns that record: the converter reads it from the
release folder (:func:`release_conventions`), the exporter from the training config, and the
sampler, Editor, trainer and parity checks take it from :func:`read_conventions`. A checkpoint
written before the record existed still loads: its conventions are rebuilt from the older
top-level fields, the mask id from the transformer config (``vocab_size - 1``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from editmgt_jax.sampling.region_hold import TIMESTEP_CONVENTIONS

FORMAT = "editmgt-jax/model"
VERSION = 1

# Layout of a model checkpoint folder.
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
WORD_VOCAB_FILE = "vocab.txt"                      # the small text encoder's word tokenizer
TOKENIZER_DIRS = ("tokenizer", "llm_tokenizer")    # the release's CLIP and Gemma-2 tokenizer files
SMALL_TEXT = "small_text"                          # component name of the small text encoder


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, or made for another configuration."""


# ---------------------------------------------------------------------------------------------
# Model conventions

# The official demo's negative prompt for the released 1024 px model.
RELEASE_NEGATIVE_PROMPT = ("worst quality, low quality, low res, blurry, distortion, watermark, logo, signature, "
                           "text, jpeg artifacts, signature, sketch, duplicate, ugly, identifying mark")
# The official demo's edit settings (``infer.py``: 36 steps, guidance 6, reference strength 1.1;
# the pipeline's temperature schedule (2, 0)). Region hold is off unless asked for.
RELEASE_SAMPLER = {"steps": 36, "guidance_scale": 6.0, "reference_strength": 1.1,
                   "temperature_start": 2.0, "temperature_end": 0.0}
# Sampler settings a conventions record may recommend (``SamplerConfig`` fields).
SAMPLER_KEYS = ("steps", "guidance_scale", "reference_strength", "hold_threshold", "consolidation_blocks",
                "capture_mode", "greedy", "freeze_held", "temperature_start", "temperature_end", "score_grid")
SCHEDULER_CONFIG = os.path.join("scheduler", "scheduler_config.json")


@dataclasses.dataclass(frozen=True)
class Conventions:
    """How a model checkpoint must be driven, beyond its weights.

    Attributes:
      mask_token_id: the id of the mask token in the transformer's vocabulary. The release names it
        in ``scheduler/scheduler_config.json`` (8255 = ``vocab_size - 1``); it is never the logits
        width (the codebook size, an embedding row the release never trained as the mask).
      timestep_convention: what the transformer gets as its timestep: ``"step_index"`` (the release's
        sampler, ``steps - 1 - step``) or ``"mask_fraction"`` (models trained here).
      aesthetic_score: last micro-condition (the official pipeline's default 6).
      crop_coords: ``(crop_top, crop_left)`` micro-conditions (official default ``(0, 0)``).
      negative_prompt: the unconditional prompt for classifier-free guidance.
      resolution: working resolution in pixels.
      masking_schedule: the re-masking schedule (the release's scheduler: ``"cosine"``).
      sampler: recommended sampler settings (``SamplerConfig`` fields, see :data:`SAMPLER_KEYS`).
      source: where the mask id came from (a file, ``"transformer vocab_size - 1"``, ...).
    """

    mask_token_id: int
    timestep_convention: str = "step_index"
    aesthetic_score: float = 6.0
    crop_coords: tuple[float, float] = (0.0, 0.0)
    negative_prompt: str = ""
    resolution: int = 1024
    masking_schedule: str = "cosine"
    sampler: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    source: str = ""

    def __post_init__(self):
        if isinstance(self.mask_token_id, bool) or not isinstance(self.mask_token_id, (int, np.integer)):
            raise CheckpointError(f"conventions: mask_token_id must be an integer, got {self.mask_token_id!r}")
        object.__setattr__(self, "mask_token_id", int(self.mask_token_id))
        if self.timestep_convention not in TIMESTEP_CONVENTIONS:
            raise CheckpointError(f"conventions: timestep_convention={self.timestep_convention!r}; expected one "
                                  f"of {TIMESTEP_CONVENTIONS}")
        if self.masking_schedule != "cosine":
            raise CheckpointError(f"conventions: masking_schedule={self.masking_schedule!r}; only 'cosine' is "
                                  f"implemented")
        unknown = sorted(set(self.sampler) - set(SAMPLER_KEYS))
        if unknown:
            raise CheckpointError(f"conventions: unknown sampler setting(s) {unknown}; known: {list(SAMPLER_KEYS)}")
        object.__setattr__(self, "crop_coords", tuple(float(c) for c in self.crop_coords))
        object.__setattr__(self, "aesthetic_score", float(self.aesthetic_score))
        object.__setattr__(self, "resolution", int(self.resolution))
        object.__setattr__(self, "sampler", {k: tuple(v) if isinstance(v, list) else v
                                             for k, v in dict(self.sampler).items()})

    def check_vocabulary(self, vocab_size: int, codebook_size: int, where: str = "") -> "Conventions":
        """The mask id must be an embedding row outside the codebook: ``codebook <= id < vocab``."""
        if not codebook_size <= self.mask_token_id < vocab_size:
            raise CheckpointError(f"{where or 'conventions'}: mask_token_id {self.mask_token_id} "
                                  f"({self.source or 'conventions'}) must lie in [codebook_size "
                                  f"{codebook_size}, vocab_size {vocab_size})")
        return self

    def micro_conds(self, width: float, height: float) -> tuple[float, ...]:
        """``[width, height, crop_top, crop_left, aesthetic]`` as the official pipeline builds them."""
        return (float(width), float(height), *self.crop_coords, self.aesthetic_score)

    def sampler_settings(self) -> dict:
        """Keyword arguments for ``SamplerConfig``: the recommended settings plus the mask id, the
        timestep convention and the micro-conditions at the working resolution."""
        return {**self.sampler, "mask_token_id": self.mask_token_id,
                "timestep_convention": self.timestep_convention,
                "micro_conds": self.micro_conds(self.resolution, self.resolution)}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["crop_coords"] = list(self.crop_coords)
        d["sampler"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.sampler.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "") -> "Conventions":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CheckpointError(f"{where or 'conventions'}: unknown field(s) {unknown}")
        if "mask_token_id" not in d:
            raise CheckpointError(f"{where or 'conventions'}: no mask_token_id")
        try:
            return cls(**dict(d))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where or 'conventions'}: {e}") from None


def default_mask_token_id(transformer_config: Mapping) -> int:
    """The mask id when nothing names it: the last vocabulary row (``vocab_size - 1``), as the
    official training does; never the codebook size / logits width."""
    return int(transformer_config["vocab_size"]) - 1


def read_scheduler_mask_id(path: str) -> int | None:
    """``mask_token_id`` of a scheduler config file (``None`` if the file does not exist)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if "mask_token_id" not in doc:
        raise CheckpointError(f"{path}: no 'mask_token_id' field")
    mid = doc["mask_token_id"]
    if isinstance(mid, bool) or not isinstance(mid, int):
        raise CheckpointError(f"{path}: mask_token_id must be an integer, got {mid!r}")
    schedule = doc.get("masking_schedule", "cosine")
    if schedule != "cosine":
        raise CheckpointError(f"{path}: masking_schedule={schedule!r}; only 'cosine' is implemented")
    return mid


def release_conventions(release_dir: str, transformer_config: Mapping, *,
                        scheduler_config: str | None = None) -> Conventions:
    """The conventions of an official release folder (or a reference-fixture folder).

    The mask id comes from ``scheduler/scheduler_config.json`` (or ``scheduler_config``, a path
    relative to ``release_dir``) when present, else ``vocab_size - 1`` of ``transformer_config``
    (our field names or the official ones: both spell it ``vocab_size``). The rest is the official
    pipeline's: step-index timesteps, aesthetic 6 and crop (0, 0), the demo's negative prompt and
    edit settings at 1024 px.
    """
    rel = scheduler_config or SCHEDULER_CONFIG
    f = os.path.join(release_dir, rel)
    mid = read_scheduler_mask_id(f)
    source = rel
    if mid is None:
        mid, source = default_mask_token_id(transformer_config), "transformer vocab_size - 1"
    conv = Conventions(mask_token_id=mid, timestep_convention="step_index", aesthetic_score=6.0,
                       crop_coords=(0.0, 0.0), negative_prompt=RELEASE_NEGATIVE_PROMPT, resolution=1024,
                       sampler=dict(RELEASE_SAMPLER), source=source)
    return conv.check_vocabulary(int(transformer_config["vocab_size"]), int(transformer_config["codebook_size"]),
                                 f if os.path.isfile(f) else release_dir)


def legacy_conventions(doc: Mapping, *, mask_token_id: int | None = None,
                       source: str = "transformer vocab_size - 1 (checkpoint without a conventions record)"
                       ) -> Conventions:
    """Conventions from a checkpoint's older fields: ``timestep_convention`` and ``sampler_defaults``
    (resolution, micro_conds, negative_prompt, sampler settings). The mask id is ``mask_token_id``,
    else the transformer config's ``vocab_size - 1`` (what checkpoints written before the record
    existed were trained and converted with). The exporter builds its record this way too."""
    tr = doc.get("components", {}).get("transformer")
    if tr is None:
        raise CheckpointError("checkpoint has no transformer component: no mask id to infer")
    sd = dict(doc.get("sampler_defaults") or {})
    micro = sd.get("micro_conds")
    aesthetic = float(micro[4]) if micro else float(sd.get("aesthetic_score", 6.0))
    crop = (float(micro[2]), float(micro[3])) if micro else (0.0, 0.0)
    convention = sd.get("timestep_convention", doc.get("timestep_convention", "step_index"))
    return Conventions(mask_token_id=default_mask_token_id(tr) if mask_token_id is None else mask_token_id,
                       timestep_convention=convention, aesthetic_score=aesthetic, crop_coords=crop,
                       negative_prompt=str(sd.get("negative_prompt", "")),
                       resolution=int(sd.get("resolution", 1024)),
                       sampler={k: v for k, v in sd.items() if k in SAMPLER_KEYS}, source=source)


def read_conventions(doc_or_path: Mapping | str | os.PathLike) -> Conventions:
    """The conventions of a model checkpoint (its ``config.json`` dict, or its folder)."""
    doc = doc_or_path if isinstance(doc_or_path, Mapping) else read_config(doc_or_path)
    where = "config.json conventions"
    conv = (Conventions.from_dict(doc["conventions"], where) if "conventions" in doc
            else legacy_conventions(doc))
    tr = doc.get("components", {}).get("transformer")
    if tr is not None:
        conv.check_vocabulary(int(tr["vocab_size"]), int(tr["codebook_size"]), where)
    return conv


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


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


# Bytes in flight while Orbax copies a component's arrays for writing: without a limit it copies
# the whole component first, doubling the peak memory of a conversion.
SAVE_CONCURRENT_GB = 1


def save_component(path: str, name: str, tree: Mapping) -> None:
    """Write one component's parameters (nested dicts of numpy or jax arrays).

    Numpy leaves of mutable dicts are replaced in place, one at a time, by host (CPU) jax arrays, and
    Orbax copies at most :data:`SAVE_CONCURRENT_GB` of them at once, so a component converted in
    host memory is never held twice (peak: the component plus about one tensor)."""
    import orbax.checkpoint as ocp

    tree = _host_arrays(tree, jax.devices("cpu")[0])
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(save_device_host_concurrent_gb=SAVE_CONCURRENT_GB))
    ckptr.save(os.path.join(os.path.abspath(path), "params", name), args=ocp.args.PyTreeSave(tree))


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
    try:
        with open(f) as fh:
            doc = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e}); the checkpoint is damaged") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        doc = doc if isinstance(doc, dict) else {}
        raise CheckpointError(f"{f}: format {doc.get('format')!r}, expected {FORMAT!r}")
    return doc


# ---------------------------------------------------------------------------------------------
# Modules: the one eval_shape -> load -> merge


def component_classes(name: str):
    """``(config class, module class)`` of a checkpoint component (``vq``, ``transformer``,
    ``clip``, ``gemma`` or ``small_text``)."""
    if name == SMALL_TEXT:
        from editmgt_jax.models.text.small import SmallTextConfig, SmallTextEncoder

        return SmallTextConfig, SmallTextEncoder
    from editmgt_jax.convert.registry import COMPONENTS

    if name not in COMPONENTS:
        raise CheckpointError(f"unknown component {name!r}; known: {sorted(COMPONENTS) + [SMALL_TEXT]}")
    return COMPONENTS[name].classes()


def component_config(name: str, cfg, where: str = ""):
    """The config object of component ``name`` from its ``config.json`` dict (or the object itself)."""
    config_cls, _ = component_classes(name)
    if isinstance(cfg, config_cls):
        return cfg
    try:
        return config_cls.from_dict(dict(cfg))
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{where or 'checkpoint'}: config of component {name!r} is not valid: {e}") from e


def abstract_module(name: str, cfg, *, dtype=None, **kwargs):
    """Component ``name`` built abstractly (``nnx.eval_shape``: shapes only, nothing allocated).

    ``dtype`` is the parameter and the compute dtype (default float32)."""
    import jax.numpy as jnp
    from flax import nnx

    _, model_cls = component_classes(name)
    cfg = component_config(name, cfg)
    dt = jnp.dtype(dtype or jnp.float32)
    return nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0), dtype=dt, param_dtype=dt, **kwargs))


def merge_params(abstract, params: Mapping):
    """A concrete module from an abstract one and its parameters (nested dicts of arrays)."""
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def load_module(path: str | os.PathLike, name: str, cfg_dict: Mapping | None = None, *, dtype=None,
                shardings=None):
    """Component ``name`` of the checkpoint at ``path`` as a module: built from its config (from
    ``config.json`` unless ``cfg_dict`` is given), parameters restored (and cast to ``dtype``:
    ``float32`` default or ``bfloat16``; ``shardings`` places them)."""
    import jax.numpy as jnp
    from flax import nnx

    path = os.fspath(path)
    dt = jnp.dtype(dtype or jnp.float32)
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dt}")
    if cfg_dict is None:
        comps = read_config(path).get("components", {})
        if name not in comps:
            raise CheckpointError(f"{path}: no {name!r} component (it has {sorted(comps)})")
        cfg_dict = comps[name]
    abstract = abstract_module(name, component_config(name, cfg_dict, path), dtype=dt)
    graphdef, state = nnx.split(abstract)
    params = load_component(path, name, state.to_pure_dict(), shardings)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


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

    return WordTokenizer.load(os.path.join(os.fspath(path), WORD_VOCAB_FILE))


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
