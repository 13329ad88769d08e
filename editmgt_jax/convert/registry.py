"""The four components of an EditMGT release and how each is converted.

A release component is a model of ``models.registry.MODELS`` plus what the converter alone needs:
its rule table (beside this file, one per component), its folder names in a release and its file
prefix in a reference-fixture folder. Configs come from the official ``config.json`` of each
subfolder.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Callable, Mapping

import numpy as np

from editmgt_jax.convert.core import ConversionError, TensorSource, convert_tensors
from editmgt_jax.models.registry import MODELS


@dataclasses.dataclass(frozen=True)
class Component:
    name: str                 # the model's name in models.registry.MODELS (the checkpoint key)
    rules_module: str         # module with ``rules(cfg) -> list[Rule]``
    release_dirs: tuple[str, ...]   # subfolder names in an official release folder
    fixture_prefix: str       # file prefix in a reference-fixture folder (``<prefix>.safetensors``)
    required: bool = True

    def classes(self):
        return MODELS[self.name].classes()

    def rules(self, cfg):
        return importlib.import_module(self.rules_module).rules(cfg)


COMPONENTS: dict[str, Component] = {c.name: c for c in (
    Component("vq", "editmgt_jax.convert.vq", ("vqvae",), "vqvae"),
    Component("transformer", "editmgt_jax.convert.transformer", ("editmgt", "transformer"), "transformer"),
    Component("clip", "editmgt_jax.convert.clip", ("text_encoder",), "clip_text", required=False),
    Component("gemma", "editmgt_jax.convert.gemma2", ("llm_encoder",), "gemma2", required=False),
)}


def read_json(path: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ConversionError(f"{path}: config file not found") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def config_from_official(component: Component, official: Mapping, where: str = ""):
    config_cls, _ = component.classes()
    try:
        return config_cls.from_official(dict(official))
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{where or component.name}: unsupported {component.name} config: {e}") from e


def abstract_params(component: Component, cfg) -> dict:
    """Shape/dtype tree of the component's parameters (no memory allocated)."""
    from flax import nnx

    from editmgt_jax import checkpoints

    return nnx.to_pure_dict(nnx.split(checkpoints.abstract_module(component.name, cfg))[1])


def convert_component(component: Component, cfg, source: TensorSource, *, dtype=np.float32,
                      progress: Callable[[str], None] | None = None,
                      select: Callable[[tuple], bool] | None = None) -> dict:
    return convert_tensors(source, component.rules(cfg), abstract_params(component, cfg),
                           component=component.name, dtype=dtype, progress=progress, select=select)


def find_release_dir(root: str, component: Component) -> str | None:
    for d in component.release_dirs:
        p = os.path.join(root, d)
        if os.path.isdir(p):
            return p
    return None


def instantiate(component: Component | str, cfg, params: Mapping, **kwargs):
    """An NNX module of ``component`` with ``params`` (nested dicts of arrays) loaded, no init cost
    (:func:`editmgt_jax.checkpoints.abstract_module` + :func:`~editmgt_jax.checkpoints.merge_params`)."""
    from editmgt_jax import checkpoints

    name = component if isinstance(component, str) else component.name
    return checkpoints.merge_params(checkpoints.abstract_module(name, cfg, **kwargs), params)
