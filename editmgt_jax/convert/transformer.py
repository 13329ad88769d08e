"""Official ``Transformer2DModel`` state dict -> :class:`editmgt_jax.models.transformer.EditTransformer`.

One rule per official tensor name pattern; ``\\1`` carries the block index. Layouts: torch Linear
``[out, in]`` -> kernel ``[in, out]``; Conv2d ``[out, in, kh, kw]`` -> ``[kh, kw, in, out]``;
ConvTranspose2d ``[in, out, kh, kw]`` -> ``[kh, kw, in, out]``; norm ``weight`` -> ``scale``.
"""

from __future__ import annotations

from editmgt_jax.convert.core import Rule, conv, conv_transpose, identity, linear
from editmgt_jax.models.transformer import TransformerConfig

_N = r"(\d+)"

# (official module path, our module path) for every Linear with a bias.
_LINEARS = [
    ("context_embedder", "context_embedder"),
    ("time_text_embed\\.timestep_embedder\\.linear_1", "time_text_embed/timestep_embedder/linear_1"),
    ("time_text_embed\\.timestep_embedder\\.linear_2", "time_text_embed/timestep_embedder/linear_2"),
    ("time_text_embed\\.text_embedder\\.linear_1", "time_text_embed/text_embedder/linear_1"),
    ("time_text_embed\\.text_embedder\\.linear_2", "time_text_embed/text_embedder/linear_2"),
    # dual-stream blocks
    (f"transformer_blocks\\.{_N}\\.norm1\\.linear", r"transformer_blocks/\1/norm1/linear"),
    (f"transformer_blocks\\.{_N}\\.norm1_context\\.linear", r"transformer_blocks/\1/norm1_context/linear"),
    (f"transformer_blocks\\.{_N}\\.attn\\.to_q", r"transformer_blocks/\1/attn/to_q"),
    (f"transformer_blocks\\.{_N}\\.attn\\.to_k", r"transformer_blocks/\1/attn/to_k"),
    (f"transformer_blocks\\.{_N}\\.attn\\.to_v", r"transformer_blocks/\1/attn/to_v"),
    (f"transformer_blocks\\.{_N}\\.attn\\.to_out\\.0", r"transformer_blocks/\1/attn/to_out"),
    (f"transformer_blocks\\.{_N}\\.attn\\.add_q_proj", r"transformer_blocks/\1/attn/add_q_proj"),
    (f"transformer_blocks\\.{_N}\\.attn\\.add_k_proj", r"transformer_blocks/\1/attn/add_k_proj"),
    (f"transformer_blocks\\.{_N}\\.attn\\.add_v_proj", r"transformer_blocks/\1/attn/add_v_proj"),
    (f"transformer_blocks\\.{_N}\\.attn\\.to_add_out", r"transformer_blocks/\1/attn/to_add_out"),
    (f"transformer_blocks\\.{_N}\\.ff\\.net\\.0\\.proj", r"transformer_blocks/\1/ff/proj_in"),
    (f"transformer_blocks\\.{_N}\\.ff\\.net\\.2", r"transformer_blocks/\1/ff/proj_out"),
    (f"transformer_blocks\\.{_N}\\.ff_context\\.net\\.0\\.proj", r"transformer_blocks/\1/ff_context/proj_in"),
    (f"transformer_blocks\\.{_N}\\.ff_context\\.net\\.2", r"transformer_blocks/\1/ff_context/proj_out"),
    # single-stream blocks
    (f"single_transformer_blocks\\.{_N}\\.norm\\.linear", r"single_transformer_blocks/\1/norm/linear"),
    (f"single_transformer_blocks\\.{_N}\\.attn\\.to_q", r"single_transformer_blocks/\1/attn/to_q"),
    (f"single_transformer_blocks\\.{_N}\\.attn\\.to_k", r"single_transformer_blocks/\1/attn/to_k"),
    (f"single_transformer_blocks\\.{_N}\\.attn\\.to_v", r"single_transformer_blocks/\1/attn/to_v"),
    (f"single_transformer_blocks\\.{_N}\\.proj_mlp", r"single_transformer_blocks/\1/proj_mlp"),
    (f"single_transformer_blocks\\.{_N}\\.proj_out", r"single_transformer_blocks/\1/proj_out"),
]

# Linears without a bias.
_LINEARS_NO_BIAS = [
    ("cond_embed\\.linear_1", "cond_embed/linear_1"),
    ("cond_embed\\.linear_2", "cond_embed/linear_2"),
    ("project_to_hidden", "project_to_hidden"),
    ("project_from_hidden", "project_from_hidden"),
]

# RMSNorm weights.
_NORMS = [
    ("embed\\.layer_norm", "embed/layer_norm"),
    ("encoder_proj_layer_norm", "encoder_proj_layer_norm"),
    ("project_to_hidden_norm", "project_to_hidden_norm"),
    ("project_from_hidden_norm", "project_from_hidden_norm"),
    ("mlm_layer\\.layer_norm", "mlm_layer/layer_norm"),
    (f"transformer_blocks\\.{_N}\\.attn\\.norm_q", r"transformer_blocks/\1/attn/norm_q"),
    (f"transformer_blocks\\.{_N}\\.attn\\.norm_k", r"transformer_blocks/\1/attn/norm_k"),
    (f"transformer_blocks\\.{_N}\\.attn\\.norm_added_q", r"transformer_blocks/\1/attn/norm_added_q"),
    (f"transformer_blocks\\.{_N}\\.attn\\.norm_added_k", r"transformer_blocks/\1/attn/norm_added_k"),
    (f"single_transformer_blocks\\.{_N}\\.attn\\.norm_q", r"single_transformer_blocks/\1/attn/norm_q"),
    (f"single_transformer_blocks\\.{_N}\\.attn\\.norm_k", r"single_transformer_blocks/\1/attn/norm_k"),
]

# 1x1 convolutions (no bias).
_CONVS = [
    ("embed\\.conv", "embed/conv"),
    ("mlm_layer\\.conv1", "mlm_layer/conv1"),
    ("mlm_layer\\.conv2", "mlm_layer/conv2"),
]


def rules(cfg: TransformerConfig) -> list[Rule]:
    """Key table for ``cfg``; modules the config leaves out (connector, down/up blocks) get no rule, so
    a checkpoint that has them fails conversion with those keys named."""
    out: list[Rule] = []
    for src, dst in _LINEARS:
        out.append(Rule(src + r"\.weight", dst + "/kernel", linear))
        out.append(Rule(src + r"\.bias", dst + "/bias", identity))
    for src, dst in _LINEARS_NO_BIAS:
        out.append(Rule(src + r"\.weight", dst + "/kernel", linear))
    for src, dst in _NORMS:
        out.append(Rule(src + r"\.weight", dst + "/scale", identity))
    for src, dst in _CONVS:
        out.append(Rule(src + r"\.weight", dst + "/kernel", conv))
    out.append(Rule(r"embed\.embeddings\.weight", "embed/embeddings/embedding", identity))
    if cfg.connector_type == "linear":
        out.append(Rule(r"connector\.projector\.weight", "connector/projector/kernel", linear))
        out.append(Rule(r"connector\.projector\.bias", "connector/projector/bias", identity))
    if cfg.downsample:
        out.append(Rule(r"down_block\.downsample\.norm\.weight", "down_block/downsample/norm/scale", identity))
        out.append(Rule(r"down_block\.downsample\.conv\.weight", "down_block/downsample/conv/kernel", conv))
        out.append(Rule(r"up_block\.upsample\.norm\.weight", "up_block/upsample/norm/scale", identity))
        out.append(Rule(r"up_block\.upsample\.conv\.weight", "up_block/upsample/conv/kernel", conv_transpose))
    return out
