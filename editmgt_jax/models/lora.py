"""Low-rank adapters (LoRA) on the transformer's linear layers, built on ``nnx.LoRA``.

A targeted layer ``y = x W + b`` becomes ``y = x W + b + s * (alpha / r) * (x A) B`` with ``A``
``[in, r]`` (``he_uniform``) and ``B`` ``[r, out]`` (zeros: an adapted model starts as the base),
the official trainer's LoRA (peft ``LoraConfig(r, lora_alpha, target_modules)``) and its scale ``s``
(the pipeline's ``lora_scale``). The adapters are ``nnx.LoRAParam`` variables at
``<layer>/lora/lora_a`` and ``<layer>/lora/lora_b``, beside the layer's ``kernel`` and ``bias`` (whose
paths do not change), so a filter on ``nnx.LoRAParam`` selects exactly what fine-tuning trains.

Targets are attribute names of ``Linear`` layers, matched anywhere in the model like peft's
``target_modules``; the official default (``train/train.py``) is ``to_q``, ``to_k``, ``to_v``: the
image-stream query/key/value projections of every dual- and single-stream block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from editmgt_jax.models.layers import Linear

# The official trainer's target modules (``--lora_target_modules`` default) and the rank and alpha
# its README recommends (``--lora_r 32 --lora_alpha 128``; the argparse defaults are 16 and 32).
OFFICIAL_TARGETS = ("to_q", "to_k", "to_v")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 32
    alpha: float = 128.0
    targets: tuple[str, ...] = OFFICIAL_TARGETS

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(str(t) for t in self.targets))
        if int(self.rank) < 1:
            raise ValueError(f"lora rank must be >= 1, got {self.rank}")
        if not np.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"lora alpha must be finite and > 0, got {self.alpha}")
        if not self.targets:
            raise ValueError("lora targets is empty: name the linear layers to adapt (e.g. to_q, to_k, to_v)")

    @property
    def scaling(self) -> float:
        """``alpha / rank``: what multiplies ``x A B`` at scale 1."""
        return float(self.alpha) / int(self.rank)

    def to_dict(self) -> dict:
        return {"rank": int(self.rank), "alpha": float(self.alpha), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "LoRAConfig":
        unknown = sorted(set(d) - {"rank", "alpha", "targets", "enabled"})
        if unknown:
            raise ValueError(f"lora: unknown field(s) {unknown} (rank, alpha, targets)")
        return cls(rank=int(d.get("rank", 32)), alpha=float(d.get("alpha", 128.0)),
                   targets=tuple(d.get("targets", OFFICIAL_TARGETS)))


class LoRALinear(Linear):
    """A ``Linear`` with an ``nnx.LoRA`` adapter: ``Linear(x) + scale * lora(x)``.

    ``scale`` is ``s * alpha / rank``; it is a static attribute (changing it means another program).
    """

    def __init__(self, in_features: int, out_features: int, *, rank: int, scale: float, rngs: nnx.Rngs,
                 dtype=None, param_dtype=jnp.float32, **kwargs):
        super().__init__(in_features, out_features, rngs=rngs, dtype=dtype, param_dtype=param_dtype, **kwargs)
        self.lora = nnx.LoRA(in_features, rank, out_features, dtype=dtype, param_dtype=param_dtype,
                             lora_param_type=nnx.LoRAParam, rngs=rngs)
        self.lora_scale = float(scale)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        return y + (self.lora(x) * self.lora_scale).astype(y.dtype)


def _targets(model: nnx.Module, targets: Sequence[str]) -> list[tuple[tuple, nnx.Module]]:
    found = [(path, m) for path, m in nnx.iter_modules(model)
             if path and isinstance(m, Linear) and not isinstance(m, LoRALinear) and str(path[-1]) in targets]
    missing = sorted(set(targets) - {str(p[-1]) for p, _ in found})
    if missing:
        raise ValueError(f"lora targets {missing} name no linear layer of the model (layers are named like "
                         f"the official modules: to_q, to_k, to_v, to_out, add_q_proj, proj_mlp, ...)")
    return found


def add_lora(model: nnx.Module, cfg: LoRAConfig, *, rngs: nnx.Rngs, scale: float = 1.0) -> nnx.Module:
    """Give every ``Linear`` of ``model`` named in ``cfg.targets`` an adapter (in place; returns
    ``model``). The layers keep their ``kernel`` and ``bias`` variables (values and sharding)."""
    for path, old in _targets(model, cfg.targets):
        new = LoRALinear(old.in_features, old.out_features, rank=int(cfg.rank), scale=scale * cfg.scaling,
                         rngs=rngs, dtype=old.dtype, param_dtype=old.param_dtype, use_bias=old.bias is not None,
                         precision=old.precision)
        new.kernel = old.kernel
        new.bias = old.bias
        parent = model
        for k in path[:-1]:
            parent = parent[k] if isinstance(k, int) else getattr(parent, k)
        setattr(parent, path[-1], new)
    return model


def has_adapters(params: Mapping) -> bool:
    """Whether a parameter tree (nested dicts) holds LoRA adapters."""
    return any(k == "lora" or (isinstance(v, Mapping) and has_adapters(v)) for k, v in params.items())


def merge_adapters(params: Mapping, cfg: LoRAConfig, scale: float = 1.0) -> dict:
    """The parameter tree with every adapter folded into its layer's kernel and removed:
    ``kernel + scale * (alpha / rank) * lora_a @ lora_b`` (in float32, then the kernel's dtype).
    ``scale=0`` gives the base model back. The result loads into the model without adapters."""
    out = {}
    for k, v in params.items():
        if isinstance(v, Mapping) and "lora" in v and "kernel" in v:
            a = jnp.asarray(v["lora"]["lora_a"], jnp.float32)
            b = jnp.asarray(v["lora"]["lora_b"], jnp.float32)
            kernel = jnp.asarray(v["kernel"])
            merged = kernel.astype(jnp.float32) + (float(scale) * cfg.scaling) * (a @ b)
            out[k] = {**{n: w for n, w in v.items() if n != "lora"}, "kernel": merged.astype(kernel.dtype)}
        elif isinstance(v, Mapping):
            out[k] = merge_adapters(v, cfg, scale)
        else:
            out[k] = v
    return out


def adapters_only(params: Mapping) -> dict:
    """The adapters of a parameter tree (``.../lora/lora_a``, ``lora_b``), nothing else."""
    out = {}
    for k, v in params.items():
        if k == "lora":
            out[k] = v
        elif isinstance(v, Mapping):
            sub = adapters_only(v)
            if sub:
                out[k] = sub
    return out
