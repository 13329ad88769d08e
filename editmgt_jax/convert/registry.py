"""The four components of an EditMGT release and how each is converted.

A component is (config class, module class, rule table). Configs come from the official
``config.json`` of each subfolder; rule tables live beside this file, one per component.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Callable, Mapping

import numpy as np

from editmgt_jax.convert.core import ConversionError, TensorSource, convert_tensors


@dataclasses.dataclass(frozen=True)
class Component:
    name: str                 # our name, the key in checkpoints and configs
    module: str               # python module holding the config and model classes
    config_cls: str
    model_cls: str
    rules_module: str         # module with ``rules(cfg) -> list[Rule]``
    release_dirs: tuple[str, ...]   # subfolder names in an official release folder
    fixture_prefix: str       # file prefix in a reference-fixture folder (``<prefix>.safetensors``)
    required: bool = True

    def classes(self):
        mod = importlib.import_module(self.module)
        return getattr(mod, self.config_cls), getattr(mod, self.model_cls)

    def rules(self, cfg):
        return importlib.import_module(self.rules_module).rules(cfg)


COMPONENTS: dict[str, Component] = {
    "vq": Component("vq", "editmgt_jax.models.vq", "VQConfig", "VQModel", "editmgt_jax.convert.vq",
                    ("vqvae",), "vqvae"),
    "transformer": Component("transformer", "editmgt_jax.models.transformer", "TransformerConfig",
                             "EditTransformer", "editmgt_jax.convert.transformer",
                             ("editmgt", "transformer"), "transformer"),
    "clip": Component("clip", "editmgt_jax.models.text.clip", "CLIPTextConfig",
                      "CLIPTextModelWithProjection", "editmgt_jax.convert.clip",
                      ("text_encoder",), "clip_text", required=False),
    "gemma": Component("gemma", "editmgt_jax.models.text.gemma2", "Gemma2Config", "Gemma2Encoder",
                       "editmgt_jax.convert.gemma2", ("llm_encoder",), "gemma2", required=False),
}


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
