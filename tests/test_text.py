"""Text encoders (CLIP text tower, Gemma-2 as encoder), their conversion and prompt tokenisation.

Parity is against case c of the reference fixtures (official transformers modules, float32):
tolerance ``1e-4 * max(1, max|ref|)``.
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from editmgt_jax.tools.tiny_release import byte_alphabet
from editmgt_jax.convert import clip as clip_rules
from editmgt_jax.convert import gemma2 as gemma_rules
from editmgt_jax.convert.core import ConversionError, TensorSource, convert_tensors
from editmgt_jax.models.text.clip import CLIPTextConfig, CLIPTextModelWithProjection, pooling_positions
from editmgt_jax.models.text.gemma2 import Gemma2Config, Gemma2Encoder, attention_mask, rope_tables
from editmgt_jax.models.text.tokenize import PromptTokenizer, load_clip_tokenizer, load_gemma_tokenizer


def max_err(got, ref) -> tuple[float, float]:
    """(max abs error, tolerance 1e-4 * max(1, max|ref|))."""
    ref = np.asarray(ref, np.float64)
    err = float(np.max(np.abs(np.asarray(got, np.float64) - ref)))
    return err, 1e-4 * max(1.0, float(np.max(np.abs(ref))))


def load(model_cls, cfg, rules, files):
    """Convert official safetensors into ``model_cls(cfg)``; returns ``(graphdef, state)``."""
    abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    params = convert_tensors(TensorSource(files), rules(cfg), state.to_pure_dict(), component=model_cls.__name__)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return graphdef, state


@pytest.fixture(scope="module")
def clip_cfg(tiny_dir):
    return CLIPTextConfig.from_official(json.loads((tiny_dir / "clip_text_config.json").read_text()))


@pytest.fixture(scope="module")
def gemma_cfg(tiny_dir):
    return Gemma2Config.from_official(json.loads((tiny_dir / "gemma2_config.json").read_text()))


@pytest.fixture(scope="module")
def clip_model(tiny_dir, clip_cfg):
    return load(CLIPTextModelWithProjection, clip_cfg, clip_rules.rules, [tiny_dir / "clip_text.safetensors"])


@pytest.fixture(scope="module")
def gemma_model(tiny_dir, gemma_cfg):
    return load(Gemma2Encoder, gemma_cfg, gemma_rules.rules, [tiny_dir / "gemma2.safetensors"])


@functools.partial(jax.jit, static_argnums=(0,))
def _apply(graphdef, state, ids):
    """One jitted forward, compiled once per model structure and input shape."""
    return nnx.merge(graphdef, state)(ids)


@functools.partial(jax.jit, static_argnums=(0,))
def _gemma_both(graphdef, state, ids):
    model = nnx.merge(graphdef, state)
    return model(ids), model(ids, return_all=True)


# ----------------------------------------------------------------------------- parity (case c)
def test_clip_parity(clip_model, cases):
    embeds, hidden = _apply(*clip_model, cases["c_clip_ids"])
    assert embeds.shape == (2, 24) and embeds.dtype == jnp.float32
    assert hidden.shape == (2, 77, 32)
    for got, name in ((embeds, "c_clip_text_embeds"), (hidden, "c_clip_last_hidden_state"),
                      (embeds, "c_encode_prompt_pooled")):
        err, tol = max_err(got, cases[name])
        assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.3g}"


def test_gemma_parity(gemma_model, cases):
    penultimate, (m2, states) = _gemma_both(*gemma_model, cases["c_gemma_ids"])
    assert len(states) == 4 and all(s.shape == (2, 256, 40) for s in states)
    err, tol = max_err(m2, cases["c_gemma_hidden_states_m2"])
    assert err <= tol, f"hidden_states[-2]: {err:.3g} > {tol:.3g}"
    for i, ref in enumerate(cases["c_gemma_hidden_states"]):
        err, tol = max_err(states[i], ref)
        assert err <= tol, f"hidden_states[{i}]: {err:.3g} > {tol:.3g}"
    # The default call (last layer skipped) gives the same penultimate states.
    np.testing.assert_allclose(np.asarray(penultimate), np.asarray(m2), rtol=0, atol=1e-6)
    err, tol = max_err(penultimate, cases["c_encode_prompt_encoder_hidden_states"])
    assert err <= tol


@pytest.fixture(scope="module")
def gemma_penultimate(tiny_dir, gemma_cfg):
    cfg = gemma_cfg.penultimate_only()
    return cfg, load(Gemma2Encoder, cfg, gemma_rules.rules, [tiny_dir / "gemma2.safetensors"])


def test_gemma_penultimate_only_model(gemma_penultimate, gemma_model, cases):
    """A model without the last layer and final norm loads from the full official checkpoint."""
    cfg, (graphdef, state) = gemma_penultimate
    assert cfg.num_layers_used == 2 and not cfg.has_final_norm
    full = dict(nnx.to_flat_state(gemma_model[1]))
    part = dict(nnx.to_flat_state(state))
    assert set(part) == {p for p in full if p[:2] != ("model", "norm") and p[2:3] != (2,)}
    for p, v in part.items():
        np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(full[p][...]))
    with pytest.raises(ValueError, match="return_all"):
        nnx.merge(graphdef, state)(jnp.asarray(cases["c_gemma_ids"]), return_all=True)


# ----------------------------------------------------------------------------- model details
def test_clip_pooling_rules():
    ids = jnp.asarray([[5, 7, 3, 7, 1], [9, 2, 2, 0, 9]], jnp.int32)
    # Legacy rule (eos id 2): first occurrence of the largest id.
    np.testing.assert_array_equal(pooling_positions(ids, 2), [1, 0])
    # Otherwise: the first position equal to the eos id, 0 when absent.
    np.testing.assert_array_equal(pooling_positions(ids, 7), [1, 0])
    np.testing.assert_array_equal(pooling_positions(ids, 3), [2, 0])
    np.testing.assert_array_equal(pooling_positions(ids, 0), [0, 3])


def test_clip_causal_and_eos_rule(clip_cfg, clip_model, cases):
    ids = np.array(cases["c_clip_ids"])
    ref_embeds, ref_hidden = _apply(*clip_model, ids)
    # Tokens after the pooled end-of-text position cannot change the pooled vector (causal mask).
    changed = ids.copy()
    changed[:, 60:] = 500
    embeds, hidden = _apply(*clip_model, changed)
    np.testing.assert_allclose(np.asarray(embeds), np.asarray(ref_embeds), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(hidden[:, :60]), np.asarray(ref_hidden[:, :60]), rtol=0, atol=1e-6)
    assert np.max(np.abs(np.asarray(hidden[:, 60:] - ref_hidden[:, 60:]))) > 1e-2
    # For these ids the non-legacy rule with the end-of-text id (999) pools the same position.
    np.testing.assert_array_equal(pooling_positions(ids, clip_cfg.eos_token_id), pooling_positions(ids, 999))
    np.testing.assert_array_equal(pooling_positions(ids, 999), [10, 41])


def test_gemma_masks_and_rope():
    # One compiled program instead of a dozen eagerly dispatched ops.
    window, causal, (cos, sin) = jax.jit(lambda: (attention_mask(5, 2), attention_mask(3, None),
                                                  rope_tables(4, 4, 10000.0)))()
    m = np.asarray(window).astype(int)
    np.testing.assert_array_equal(m, [[1, 0, 0, 0, 0],
                                      [1, 1, 0, 0, 0],
                                      [0, 1, 1, 0, 0],
                                      [0, 0, 1, 1, 0],
                                      [0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(np.asarray(causal), np.tril(np.ones((3, 3), bool)))
    cfg = Gemma2Config(num_hidden_layers=4, sliding_window=8)
    assert [cfg.is_sliding(i) for i in range(4)] == [True, False, True, False]
    typed = Gemma2Config.from_official({"num_hidden_layers": 2, "layer_types": ["full_attention", "sliding_attention"]})
    assert [typed.is_sliding(i) for i in range(2)] == [False, True]
    # Frequencies [1, 1/100] repeated over the two halves (rotate-half layout).
    np.testing.assert_allclose(np.asarray(cos[3]), np.cos([3, 0.03, 3, 0.03]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sin[3]), np.sin([3, 0.03, 3, 0.03]), rtol=1e-6)


def test_gemma_bfloat16_activations(gemma_penultimate, cases):
    """bf16 activations over the converted float32 parameters stay near the float32 reference.

    The fixture's Gemma attention is deliberately sharp (logits up to ~70), which amplifies bf16
    rounding of q and k, so the check is on the mean relative error (observed ~1%).
    """
    cfg, (_, state) = gemma_penultimate
    g16 = nnx.split(nnx.eval_shape(lambda: Gemma2Encoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)))[0]
    out = _apply(g16, state, cases["c_gemma_ids"])
    ref = cases["c_gemma_hidden_states_m2"]
    assert out.dtype == jnp.bfloat16 and out.shape == ref.shape
    assert np.mean(np.abs(np.asarray(out, np.float32) - ref)) < 0.02 * np.mean(np.abs(ref))


# ----------------------------------------------------------------------------- configs
def test_configs_round_trip(clip_cfg, gemma_cfg):
    assert clip_cfg.eos_token_id == 2 and clip_cfg.hidden_act == "gelu" and clip_cfg.projection_dim == 24
    assert gemma_cfg.sliding_window == 8 and gemma_cfg.query_pre_attn_scalar == 16
    assert gemma_cfg.attn_logit_softcapping == 50.0 and gemma_cfg.num_key_value_heads == 1
    for cfg in (clip_cfg, gemma_cfg, gemma_cfg.penultimate_only(),
                Gemma2Config(num_hidden_layers=2, layer_types=("sliding_attention", "full_attention"))):
        d = json.loads(json.dumps(cfg.to_dict()))
        assert type(cfg).from_dict(d) == cfg
    quick = CLIPTextConfig.from_official({"hidden_act": "quick_gelu", "eos_token_id": 49407})
    assert quick.hidden_act == "quick_gelu" and quick.eos_token_id == 49407
    full = CLIPTextConfig.from_official({"projection_dim": 16, "text_config": {"hidden_size": 32,
                                                                               "num_attention_heads": 2}})
    assert full.projection_dim == 16 and full.hidden_size == 32
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig.from_official({"hidden_act": "relu6"})
    with pytest.raises(ValueError, match="num_layers_used"):
        dataclasses.replace(gemma_cfg, num_layers_used=1)
    with pytest.raises(ValueError, match="unknown field"):
        Gemma2Config.from_dict({**gemma_cfg.to_dict(), "final_logit_softcapping": 30.0})


# ----------------------------------------------------------------------------- converter rejections
def test_clip_converter_rejects_renamed_key(tiny_dir, clip_cfg, tmp_path):
    tensors = load_file(tiny_dir / "clip_text.safetensors")
    tensors["text_model.final_layernorm.weight"] = tensors.pop("text_model.final_layer_norm.weight")
    save_file(tensors, tmp_path / "renamed.safetensors")
    with pytest.raises(ConversionError) as e:
        load(CLIPTextModelWithProjection, clip_cfg, clip_rules.rules, [tmp_path / "renamed.safetensors"])
    msg = str(e.value)
    assert "text_model.final_layernorm.weight" in msg and "text_model/final_layer_norm/scale" in msg


def test_clip_converter_ignores_position_ids_buffer(tiny_dir, clip_cfg, tmp_path):
    tensors = load_file(tiny_dir / "clip_text.safetensors")
    tensors["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    save_file(tensors, tmp_path / "with_buffer.safetensors")
    load(CLIPTextModelWithProjection, clip_cfg, clip_rules.rules, [tmp_path / "with_buffer.safetensors"])


def test_gemma_converter_rejects_reshaped_and_unknown(tiny_dir, gemma_cfg, tmp_path):
    tensors = load_file(tiny_dir / "gemma2.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = tensors["model.layers.1.self_attn.k_proj.weight"].reshape(8, 80)
    save_file(tensors, tmp_path / "reshaped.safetensors")
    with pytest.raises(ConversionError) as e:
        load(Gemma2Encoder, gemma_cfg, gemma_rules.rules, [tmp_path / "reshaped.safetensors"])
    assert "model.layers.1.self_attn.k_proj.weight" in str(e.value) and "(8, 80)" in str(e.value)

    tensors = load_file(tiny_dir / "gemma2.safetensors")
    tensors["model.layers.3.input_layernorm.weight"] = tensors["model.layers.2.input_layernorm.weight"]
    tensors["model.layers.0.self_attn.rotary_emb.scale"] = np.ones(3, np.float32)
    save_file(tensors, tmp_path / "extra.safetensors")
    for cfg in (gemma_cfg, gemma_cfg.penultimate_only()):
        with pytest.raises(ConversionError) as e:
            load(Gemma2Encoder, cfg, gemma_rules.rules, [tmp_path / "extra.safetensors"])
        assert "model.layers.3.input_layernorm.weight" in str(e.value)
        assert "model.layers.0.self_attn.rotary_emb.scale" in str(e.value)


# ----------------------------------------------------------------------------- tokenizers
bytes_to_unicode = byte_alphabet  # byte-level BPE alphabet in CLIP's vocabulary order


CLIP_MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o</w>"),
               ("w", "o"), ("r", "l"), ("wo", "rl"), ("worl", "d</w>")]
SOT, EOT = 520, 521            # after 512 byte symbols and 8 merges
HELLO, WORLD = 515, 519


def byte_id(ch: str, end_of_word: bool = False) -> int:
    """Id of a printable ASCII byte symbol in the tiny CLIP vocabulary (printables start at '!')."""
    return ord(ch) - 33 + (256 if end_of_word else 0)


@pytest.fixture
def clip_dir(tmp_path):
    d = tmp_path / "tokenizer"
    d.mkdir()
    alphabet = bytes_to_unicode()
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in CLIP_MERGES]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in CLIP_MERGES) + "\n")
    (d / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": {"content": "<|startoftext|>", "lstrip": False, "normalized": True, "rstrip": False,
                      "single_word": False},
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"}))
    return d


GEMMA_VOCAB = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "\u2581": 4, "c": 5, "a": 6, "t": 7, "ca": 8,
               "cat": 9, "\u2581cat": 10, "d": 11, "o": 12, "g": 13, "do": 14, "dog": 15, "\u2581dog": 16}


def write_gemma_dir(d, **config):
    from tokenizers import Tokenizer, models, normalizers, processors

    d.mkdir()
    merges = [("c", "a"), ("ca", "t"), ("\u2581", "cat"), ("d", "o"), ("do", "g"), ("\u2581", "dog")]
    tok = Tokenizer(models.BPE(GEMMA_VOCAB, merges, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")   # SentencePiece-style word boundary
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.save(str(d / "tokenizer.json"))
    cfg = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
           "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
           "padding_side": "left"}
    cfg.update(config)
    (d / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return d


@pytest.fixture
def gemma_dir(tmp_path):
    return write_gemma_dir(tmp_path / "llm_encoder")


def test_clip_tokenizer_ids(clip_dir):
    tok, layout = load_clip_tokenizer(clip_dir)
    assert (layout.max_length, layout.padding_side, layout.pad_id) == (77, "right", EOT)
    enc = lambda s: tok.encode(s).ids  # noqa: E731
    assert all(len(enc(s)) == 77 for s in ("", "hello", "hello " * 200))
    # Lowercased, whitespace runs collapsed, "</w>" closes every word, end-of-text pads on the right.
    assert enc("  Hello \n\t WORLD ") == [SOT, HELLO, WORLD] + [EOT] * 74
    # Punctuation is its own word; an unmerged word stays as byte symbols.
    assert enc("Hello, world!")[:7] == [SOT, HELLO, byte_id(",", True), WORLD, byte_id("!", True), EOT, EOT]
    assert enc("hi")[:4] == [SOT, byte_id("h"), byte_id("i", True), EOT]
    # Truncation keeps start and end of text: 75 content tokens.
    assert enc(" ".join(["hello"] * 100)) == [SOT] + [HELLO] * 75 + [EOT]
    # The same tokenizer saved as tokenizer.json alone gives the same ids.
    only_json = clip_dir.parent / "tokenizer_json"
    only_json.mkdir()
    tok.save(str(only_json / "tokenizer.json"))
    (only_json / "tokenizer_config.json").write_text((clip_dir / "tokenizer_config.json").read_text())
    tok2, _ = load_clip_tokenizer(only_json)
    assert tok2.encode("  Hello \n\t WORLD ").ids == enc("  Hello \n\t WORLD ")


def test_clip_tokenizer_pad_token_from_config(clip_dir):
    # Stable-Diffusion-2-style tokenizers pad with "!" (id 0) instead of the end-of-text token.
    (clip_dir / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    tok, layout = load_clip_tokenizer(clip_dir)
    assert layout.pad_id == 0
    assert tok.encode("hello").ids[:5] == [SOT, HELLO, EOT, 0, 0]


def test_gemma_tokenizer_ids(gemma_dir, tmp_path):
    tok, layout = load_gemma_tokenizer(gemma_dir)
    assert (layout.max_length, layout.padding_side, layout.pad_id) == (256, "left", 0)
    ids = tok.encode("cat dog").ids
    assert len(ids) == 256 and ids[-3:] == [2, 9, 16] and set(ids[:-3]) == {0}
    assert tok.encode("dog cat dog").ids[-4:] == [2, 15, 10, 16]
    # Truncation from the right keeps <bos> and the first 255 tokens; nothing left to pad.
    assert tok.encode("cat" + " cat" * 299).ids == [2, 9] + [10] * 254
    # tokenizer_config decides the special tokens and padding side, whatever tokenizer.json says.
    tok, _ = load_gemma_tokenizer(write_gemma_dir(tmp_path / "no_bos", add_bos_token=False))
    assert tok.encode("cat dog").ids[-3:] == [0, 9, 16]
    tok, layout = load_gemma_tokenizer(write_gemma_dir(tmp_path / "right", padding_side="right",
                                                       add_eos_token=True))
    assert layout.padding_side == "right"
    assert tok.encode("cat dog").ids[:5] == [2, 9, 16, 1, 0]
    # Without padding_side in the config, Gemma's class default (left) applies.
    _, layout = load_gemma_tokenizer(write_gemma_dir(tmp_path / "default", padding_side=None))
    assert layout.padding_side == "left"


def test_prompt_tokenizer(clip_dir, gemma_dir):
    pt = PromptTokenizer.from_dirs(clip_dir, gemma_dir)
    out = pt(["Hello world", "cat dog"])
    assert out["clip_ids"].shape == (2, 77) and out["clip_ids"].dtype == np.int32
    assert out["gemma_ids"].shape == (2, 256) and out["gemma_ids"].dtype == np.int32
    assert list(out["clip_ids"][0, :4]) == [SOT, HELLO, WORLD, EOT]
    assert list(out["gemma_ids"][1, -3:]) == [2, 9, 16]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pt(["cat", " \t "])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        pt([""])
    neg = pt([""], allow_empty=True)
    assert list(neg["clip_ids"][0]) == [SOT] + [EOT] * 76
    assert list(neg["gemma_ids"][0]) == [0] * 255 + [2]
    same = PromptTokenizer.from_folder(clip_dir.parent)(["cat dog"])
    np.testing.assert_array_equal(same["gemma_ids"], out["gemma_ids"][1:])
