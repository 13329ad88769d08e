"""Conversion table: transformers ``CLIPTextModelWithProjection`` -> :mod:`editmgt_jax.models.text.clip`."""

from __future__ import annotations

from editmgt_jax.convert.core import Rule, linear

_LAYER = r"text_model\.encoder\.layers\.(\d+)\."
_OUR_LAYER = r"text_model/encoder/layers/\1/"


def rules(cfg) -> list[Rule]:
    """Official key -> our NNX path. Every official key of the text tower is listed; buffers map to None."""
    del cfg  # the table does not depend on sizes: shapes are checked against the model
    return [
        Rule(r"text_model\.embeddings\.token_embedding\.weight", "text_model/embeddings/token_embedding/embedding"),
        Rule(r"text_model\.embeddings\.position_embedding\.weight",
             "text_model/embeddings/position_embedding/embedding"),
        Rule(r"text_model\.embeddings\.position_ids", None),
        Rule(_LAYER + r"self_attn\.(q_proj|k_proj|v_proj|out_proj)\.weight", _OUR_LAYER + r"self_attn/\2/kernel",
             linear),
        Rule(_LAYER + r"self_attn\.(q_proj|k_proj|v_proj|out_proj)\.bias", _OUR_LAYER + r"self_attn/\2/bias"),
        Rule(_LAYER + r"mlp\.(fc1|fc2)\.weight", _OUR_LAYER + r"mlp/\2/kernel", linear),
        Rule(_LAYER + r"mlp\.(fc1|fc2)\.bias", _OUR_LAYER + r"mlp/\2/bias"),
        Rule(_LAYER + r"(layer_norm1|layer_norm2)\.weight", _OUR_LAYER + r"\2/scale"),
        Rule(_LAYER + r"(layer_norm1|layer_norm2)\.bias", _OUR_LAYER + r"\2/bias"),
        Rule(r"text_model\.final_layer_norm\.weight", "text_model/final_layer_norm/scale"),
        Rule(r"text_model\.final_layer_norm\.bias", "text_model/final_layer_norm/bias"),
        Rule(r"text_projection\.weight", "text_projection/kernel", linear),
    ]
