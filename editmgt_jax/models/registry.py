"""The model registry: every component a model checkpoint can hold, by its name there.

A component is a (config class, module class) pair, imported only when asked for. The checkpoint
layer builds and restores components through this table (``checkpoints.modules``); the converter
adds, on top, each release component's key table and folder names (``convert.registry``).
"""

from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    name: str          # the key in checkpoints and configs
    module: str        # python module holding the config and model classes
    config_cls: str
    model_cls: str

    def classes(self):
        """``(config class, module class)``."""
        mod = importlib.import_module(self.module)
        return getattr(mod, self.config_cls), getattr(mod, self.model_cls)


MODELS: dict[str, ModelEntry] = {e.name: e for e in (
    ModelEntry("vq", "editmgt_jax.models.vq", "VQConfig", "VQModel"),
    ModelEntry("transformer", "editmgt_jax.models.transformer", "TransformerConfig", "EditTransformer"),
    ModelEntry("clip", "editmgt_jax.models.text.clip", "CLIPTextConfig", "CLIPTextModelWithProjection"),
    ModelEntry("gemma", "editmgt_jax.models.text.gemma2", "Gemma2Config", "Gemma2Encoder"),
    ModelEntry("small_text", "editmgt_jax.models.text.small", "SmallTextConfig", "SmallTextEncoder"),
)}
