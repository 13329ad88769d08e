"""Conversion table: transformers ``Gemma2ForCausalLM`` -> :mod:`editmgt_jax.models.text.gemma2`.

The LM head is tied to the embeddings (and usually not stored); when present it is read past. With
``cfg.num_layers_used`` one less than the layer count, the last layer and ``model.norm`` are known
keys read past as well; keys of layers beyond the config still fail the conversion.
"""

from __future__ import annotations

from editmgt_jax.convert.core import Rule, linear

_ATTN = r"(q_proj|k_proj|v_proj|o_proj)"
_MLP = r"(gate_proj|up_proj|down_proj)"
_NORMS = r"(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm)"


def _layer_rules(index: str, target: str | None, attention_bias: bool) -> list[Rule]:
    """Rules for the keys of one decoder layer (``index``: a regex for the layer number)."""
    src = rf"model\.layers\.{index}\."
    tgt = (lambda t: None) if target is None else (lambda t: target + t)  # noqa: E731
    out = [
        Rule(src + r"self_attn\." + _ATTN + r"\.weight", tgt(r"self_attn/\2/kernel"), linear),
        Rule(src + r"mlp\." + _MLP + r"\.weight", tgt(r"mlp/\2/kernel"), linear),
        Rule(src + _NORMS + r"\.weight", tgt(r"\2/scale")),
    ]
    if attention_bias:
        out.append(Rule(src + r"self_attn\." + _ATTN + r"\.bias", tgt(r"self_attn/\2/bias")))
    return out


def rules(cfg) -> list[Rule]:
    """Official key -> our NNX path for ``cfg`` (a :class:`~editmgt_jax.models.text.gemma2.Gemma2Config`)."""
    out = [
        Rule(r"model\.embed_tokens\.weight", "model/embed_tokens/embedding"),
        Rule(r"lm_head\.weight", None),
        Rule(r"model\.norm\.weight", "model/norm/scale" if cfg.has_final_norm else None),
    ]
    # Layers that exist in the checkpoint but are not built come first, so they are not loaded.
    for i in range(cfg.num_layers_built, cfg.num_hidden_layers):
        out += _layer_rules(f"({i})", None, cfg.attention_bias)
    out += _layer_rules(r"(\d+)", r"model/layers/\1/", cfg.attention_bias)
    return out
