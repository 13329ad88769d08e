"""Configuration of the EditMGT transformer: the released ``config.json`` and ``TransformerConfig``
(read from the official field names, checked, and written back as ``to_dict``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


# config.json of the released EditMGT transformer (official field names and values).
RELEASED_CONFIG: dict[str, Any] = {
    "_class_name": "Transformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "codebook_size": 8192,
    "connector_type": "linear",
    "downsample": True,
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": 2304,
    "num_attention_heads": 8,
    "num_layers": 14,
    "num_single_layers": 28,
    "patch_size": 1,
    "pooled_projection_dim": 1024,
    "text_encoder_architecture": "CLIP_Gemma2",
    "upsample": True,
    "vocab_size": 8256,
}

# Defaults of the official constructor, used for fields a config.json leaves out.
_OFFICIAL_DEFAULTS: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": False, "axes_dims_rope": (16, 56, 56),
    "vocab_size": 8256, "codebook_size": 8192, "downsample": False, "upsample": False,
    "text_encoder_architecture": "CLIP", "connector_type": "none",
}
_CONNECTORS = ("linear", "none")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture of the EditMGT transformer (defaults: the released 1024 px model)."""

    num_layers: int = 14                  # dual-stream (MM-DiT) blocks
    num_single_layers: int = 28           # single-stream blocks
    num_attention_heads: int = 8
    attention_head_dim: int = 128
    joint_attention_dim: int = 2304       # width of the LLM text states (connector input)
    pooled_projection_dim: int = 1024     # width of the pooled CLIP vector
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    vocab_size: int = 8256                # codebook + special ids; the last id is the mask token
    codebook_size: int = 8192             # logits per position
    downsample: bool = True               # 2x2 stride-2 conv after the embedding (and 2x up-sampling head)
    connector_type: str = "linear"        # "linear": Linear text connector; "none": no connector
    text_encoder_architecture: str = "CLIP_Gemma2"
    rope_theta: float = 10000.0
    mlp_ratio: int = 4

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(d) for d in self.axes_dims_rope))
        if self.connector_type not in _CONNECTORS:
            raise ValueError(f"connector_type {self.connector_type!r} is not supported "
                             f"(use one of {_CONNECTORS})")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                             f"{self.attention_head_dim}")
        if any(d % 2 for d in self.axes_dims_rope) or len(self.axes_dims_rope) != 3:
            raise ValueError(f"axes_dims_rope must be 3 even widths, got {self.axes_dims_rope}")
        if self.codebook_size >= self.vocab_size:
            raise ValueError(f"codebook_size {self.codebook_size} must be below vocab_size {self.vocab_size}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mask_token_id(self) -> int:
        return self.vocab_size - 1

    @property
    def num_blocks(self) -> int:
        """Dual plus single blocks: global block indices run over ``range(num_blocks)``."""
        return self.num_layers + self.num_single_layers

    @classmethod
    def from_official(cls, d: Mapping[str, Any]) -> "TransformerConfig":
        """Read an official ``Transformer2DModel`` ``config.json`` dict.

        Raises ``ValueError`` naming any field whose value this implementation does not support.
        """
        unknown = sorted(k for k in d if not k.startswith("_") and k not in _OFFICIAL_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown transformer config field(s): {', '.join(unknown)}")
        g = {**_OFFICIAL_DEFAULTS, **{k: v for k, v in d.items() if not k.startswith("_")}}
        bad = []
        if g["patch_size"] != 1:
            bad.append(f"patch_size={g['patch_size']!r} (only 1)")
        if g["guidance_embeds"]:
            bad.append("guidance_embeds=True (only false)")
        if bool(g["downsample"]) != bool(g["upsample"]):
            bad.append(f"downsample={g['downsample']!r} with upsample={g['upsample']!r} (must be equal)")
        connector = "none" if g["connector_type"] is None else g["connector_type"]
        if connector not in _CONNECTORS:
            bad.append(f"connector_type={connector!r} (supported: {', '.join(_CONNECTORS)})")
        if bad:
            raise ValueError("unsupported transformer config value(s): " + "; ".join(bad))
        return cls(num_layers=int(g["num_layers"]), num_single_layers=int(g["num_single_layers"]),
                   num_attention_heads=int(g["num_attention_heads"]),
                   attention_head_dim=int(g["attention_head_dim"]),
                   joint_attention_dim=int(g["joint_attention_dim"]),
                   pooled_projection_dim=int(g["pooled_projection_dim"]),
                   axes_dims_rope=tuple(g["axes_dims_rope"]), vocab_size=int(g["vocab_size"]),
                   codebook_size=int(g["codebook_size"]), downsample=bool(g["downsample"]),
                   connector_type=connector, text_encoder_architecture=str(g["text_encoder_architecture"]))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TransformerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TransformerConfig field(s): {', '.join(unknown)}")
        return cls(**dict(d))
