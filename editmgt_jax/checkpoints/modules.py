"""Checkpoint components as modules: the one ``nnx.eval_shape`` -> load -> merge.

A component (``vq``, ``transformer``, ``clip``, ``gemma`` or ``small_text``) is built abstractly from
its ``config.json`` entry (shapes only, nothing allocated), its parameters are restored onto that
abstract state and merged into a concrete module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax

from editmgt_jax.checkpoints.io import load_component
from editmgt_jax.checkpoints.layout import CheckpointError, read_config
from editmgt_jax.models.registry import MODELS


def component_classes(name: str):
    """``(config class, module class)`` of a checkpoint component (``models.registry.MODELS``:
    ``vq``, ``transformer``, ``clip``, ``gemma`` or ``small_text``)."""
    if name not in MODELS:
        raise CheckpointError(f"unknown component {name!r}; known: {sorted(MODELS)}")
    return MODELS[name].classes()


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


def lora_of(path: str | os.PathLike):
    """The ``LoRAConfig`` of a checkpoint whose transformer carries adapters (``config.json`` key
    ``"lora"``, written by a LoRA fine-tune), else None."""
    doc = read_config(path).get("lora")
    if not doc:
        return None
    from editmgt_jax.models.lora import LoRAConfig

    try:
        return LoRAConfig.from_dict(doc)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: config.json 'lora' is not valid: {e}") from None


def load_params(path: str | os.PathLike, name: str, abstract: Mapping, shardings=None, *,
                lora_scale: float = 1.0) -> dict:
    """Component ``name``'s parameters for the tree ``abstract`` (``load_component``); a transformer
    stored with LoRA adapters is returned with them merged at ``lora_scale``
    (``kernel + lora_scale * alpha / rank * lora_a @ lora_b``; 0 = the base model)."""
    lcfg = lora_of(path) if name == "transformer" else None
    if lcfg is None:
        return load_component(path, name, abstract, shardings)
    import numpy as np

    from editmgt_jax.checkpoints.io import _check_shapes, _flat
    from editmgt_jax.models.lora import merge_adapters

    merged = merge_adapters(load_component(path, name), lcfg, lora_scale)
    _check_shapes(name, os.fspath(path), merged, abstract)
    flat = _flat(merged)    # restored keys are strings; the abstract tree's list indices are ints
    merged = jax.tree_util.tree_map_with_path(
        lambda p, a: np.asarray(flat["/".join(str(getattr(k, "key", k)) for k in p)]).astype(a.dtype),
        dict(abstract))
    return merged if shardings is None else jax.device_put(merged, shardings)


def load_module(path: str | os.PathLike, name: str, cfg_dict: Mapping | None = None, *, dtype=None,
                shardings=None, lora_scale: float = 1.0):
    """Component ``name`` of the checkpoint at ``path`` as a module: built from its config (from
    ``config.json`` unless ``cfg_dict`` is given), parameters restored (and cast to ``dtype``:
    ``float32`` default or ``bfloat16``; ``shardings`` places them). A transformer with LoRA
    adapters gets them merged at ``lora_scale`` (see :func:`load_params`)."""
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
    params = load_params(path, name, state.to_pure_dict(), shardings, lora_scale=lora_scale)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
