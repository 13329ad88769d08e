"""diffusers ``VQModel`` state dict -> :class:`editmgt_jax.models.vq.VQModel` parameters.

Our module names mirror the diffusers keys, so the table pairs each official layer prefix with our
path and a layer kind: convolutions (``weight`` [out, in, kh, kw] -> ``kernel`` [kh, kw, in, out]),
GroupNorms (``weight`` -> ``scale``), linears (``weight`` [out, in] -> ``kernel`` [in, out]) and the
codebook (``quantize.embedding.weight`` -> ``quantize/embedding/embedding`` as-is). Biases are copied.
Mid-block attention keys use current diffusers names (``to_q``/``to_k``/``to_v``/``to_out.0``).
"""

from __future__ import annotations

from editmgt_jax.convert.core import Rule, conv, identity, linear
from editmgt_jax.models.vq import VQConfig

# (kind, official prefix regex, our path template). Group references refer to the prefix regex.
_RESNET_PREFIXES = (
    (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder/down_blocks/\1/resnets/\2"),
    (r"encoder\.mid_block\.resnets\.(\d+)", r"encoder/mid_block/resnets/\1"),
    (r"decoder\.mid_block\.resnets\.(\d+)", r"decoder/mid_block/resnets/\1"),
    (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)", r"decoder/up_blocks/\1/resnets/\2"),
)

_TABLE: tuple[tuple[str, str, str], ...] = (
    ("conv", r"(encoder|decoder)\.conv_in", r"\1/conv_in"),
    ("conv", r"(encoder|decoder)\.conv_out", r"\1/conv_out"),
    ("norm", r"(encoder|decoder)\.conv_norm_out", r"\1/conv_norm_out"),
    ("conv", r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", r"encoder/down_blocks/\1/downsamplers/0/conv"),
    ("conv", r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", r"decoder/up_blocks/\1/upsamplers/0/conv"),
    ("conv", r"quant_conv", "quant_conv"),
    ("conv", r"post_quant_conv", "post_quant_conv"),
    *(entry for src, dst in _RESNET_PREFIXES for entry in (
        ("norm", src + r"\.norm1", dst + "/norm1"),
        ("conv", src + r"\.conv1", dst + "/conv1"),
        ("norm", src + r"\.norm2", dst + "/norm2"),
        ("conv", src + r"\.conv2", dst + "/conv2"),
        ("conv", src + r"\.conv_shortcut", dst + "/conv_shortcut"),
    )),
)

_ATTENTION_TABLE: tuple[tuple[str, str, str], ...] = tuple(
    entry for part in ("encoder", "decoder") for entry in (
        ("norm", part + r"\.mid_block\.attentions\.0\.group_norm", part + "/mid_block/attentions/0/group_norm"),
        ("linear", part + r"\.mid_block\.attentions\.0\.(to_q|to_k|to_v)", part + r"/mid_block/attentions/0/\1"),
        ("linear", part + r"\.mid_block\.attentions\.0\.to_out\.0", part + "/mid_block/attentions/0/to_out/0"),
    ))

_WEIGHT = {"conv": ("kernel", conv), "linear": ("kernel", linear), "norm": ("scale", identity)}


def _expand(table) -> list[Rule]:
    rules = []
    for kind, src, dst in table:
        name, transform = _WEIGHT[kind]
        rules.append(Rule(src + r"\.weight", f"{dst}/{name}", transform))
        rules.append(Rule(src + r"\.bias", f"{dst}/bias"))
    return rules


def rules(cfg: VQConfig) -> list[Rule]:
    """Conversion rules for a ``VQModel`` with config ``cfg`` (attention rules only when it has them)."""
    out = _expand(_TABLE)
    if cfg.mid_block_add_attention:
        out += _expand(_ATTENTION_TABLE)
    out.append(Rule(r"quantize\.embedding\.weight", "quantize/embedding/embedding"))
    return out
