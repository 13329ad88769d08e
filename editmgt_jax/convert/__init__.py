"""Official EditMGT (PyTorch / diffusers / transformers) checkpoints -> editmgt-jax checkpoints.

``python -m editmgt_jax.convert --official DIR --out CKPT`` converts a release folder; the Python
API is :func:`convert_release` and, per component, :func:`convert_component`.
"""

from editmgt_jax.convert.core import ConversionError, Rule, TensorSource, convert_tensors
from editmgt_jax.convert.registry import COMPONENTS, Component, convert_component
from editmgt_jax.convert.release import convert_release, fixture_conventions, load_fixture_component

__all__ = ["COMPONENTS", "Component", "ConversionError", "Rule", "TensorSource", "convert_component",
           "convert_release", "convert_tensors", "fixture_conventions", "load_fixture_component"]
