"""EditMGT transformer: conversion from the official checkpoint and parity with the reference numbers.

Fixture case a (three forwards: reference strength 1.0 and 1.1, no reference) and step 0 of case d
(CFG batch with attention capture); tolerances are the fixture rule
``max abs error <= 1e-4 * max(1, max |ref|)``.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from editmgt_jax.convert.core import ConversionError, TensorSource, convert_tensors
from editmgt_jax.convert.transformer import rules
from editmgt_jax.models.attention import Segments, reference_bias
from editmgt_jax.models.blocks import text_to_image_attention
from editmgt_jax.models.embeddings import grid_position_ids, rope_tables
from editmgt_jax.models.layers import param_count
from editmgt_jax.models.transformer import (RELEASED_CONFIG, ConvTranspose2x2, EditTransformer,
                                            TransformerConfig)


def rule_tol(ref) -> float:
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


def max_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64)).max())


def logsumexp64(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return (np.log(np.exp(x - m).sum(-1, keepdims=True)) + m)[..., 0]


def abstract_state(cfg):
    return nnx.split(nnx.eval_shape(lambda: EditTransformer(cfg, rngs=nnx.Rngs(0))))


@pytest.fixture(scope="module")
def tiny_cfg(tiny_dir):
    with open(tiny_dir / "transformer_config.json") as fh:
        return TransformerConfig.from_official(json.load(fh))


@pytest.fixture(scope="module")
def tiny_model(tiny_dir, tiny_cfg):
    """(graphdef, state) of the fixture transformer, filled from the official safetensors."""
    graphdef, state = abstract_state(tiny_cfg)
    params = convert_tensors(TensorSource([tiny_dir / "transformer.safetensors"]), rules(tiny_cfg),
                             nnx.to_pure_dict(state), component="transformer")
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return graphdef, state


@pytest.fixture(scope="module")
def forward(tiny_model):
    """Jitted forward of the fixture model with a traced reference strength (one program per structure)."""
    graphdef, state = tiny_model
    cache = {}

    def run(ids, ref_ids, txt, pooled, micro, t, strength=1.0, *, capture_blocks=(), capture_mode="official"):
        key = (ref_ids is None, tuple(capture_blocks), capture_mode)
        if key not in cache:
            def f(st, ids, ref_ids, txt, pooled, micro, t, s):
                return nnx.merge(graphdef, st)(ids, ref_ids, txt, pooled, micro, t, reference_strength=s,
                                               capture_blocks=capture_blocks, capture_mode=capture_mode)
            cache[key] = jax.jit(f)
        logits, scores = cache[key](state, ids, ref_ids, txt, pooled, micro, t, jnp.float32(strength))
        return np.asarray(logits), None if scores is None else np.asarray(scores)

    return run


def case_a_args(cases, with_ref=True):
    return (cases["a_ids"], cases["a_ref_ids"] if with_ref else None, cases["a_encoder_hidden_states"],
            cases["a_pooled_projections"], cases["a_micro_conds"], cases["a_timestep"])


def check_logits(cases, logits, prefix, report):
    """Compare full logits ``[B, 64, 64, C]`` against the stored rows / max / lse / argmax."""
    rows = cases["logit_rows"]
    ours_rows = logits[:, rows].transpose(0, 3, 1, 2)      # -> [batch, codebook, row, col]
    for name, ours in [("rows", ours_rows), ("max", logits.max(-1)), ("lse", logsumexp64(logits))]:
        ref = cases[f"{prefix}_{name}"]
        err = max_err(ours, ref)
        report[f"{prefix}_{name}"] = err
        assert err <= rule_tol(ref), f"{prefix}_{name}: max abs error {err:.3g} > {rule_tol(ref):.3g}"
    decided = cases[f"{prefix}_top2gap"] >= 1e-4
    wrong = (logits.argmax(-1) != cases[f"{prefix}_argmax"]) & decided
    assert not wrong.any(), f"{prefix}: argmax differs at {int(wrong.sum())} decided positions"


# ----------------------------------------------------------------------------- config
def test_config_from_official(tiny_cfg):
    assert (tiny_cfg.num_layers, tiny_cfg.num_single_layers, tiny_cfg.inner_dim) == (2, 3, 32)
    assert tiny_cfg.axes_dims_rope == (4, 6, 6) and tiny_cfg.mask_token_id == 64
    released = TransformerConfig.from_official(RELEASED_CONFIG)
    assert released == TransformerConfig()
    assert (released.num_layers, released.num_single_layers, released.inner_dim) == (14, 28, 1024)
    assert TransformerConfig.from_dict(json.loads(json.dumps(released.to_dict()))) == released


@pytest.mark.parametrize("field,value,needle", [
    ("connector_type", "qformer", "connector_type='qformer'"),
    ("guidance_embeds", True, "guidance_embeds"),
    ("patch_size", 2, "patch_size=2"),
    ("upsample", False, "upsample=False"),
    ("axes_dims_rope", [16, 56, 54], "axes_dims_rope"),
    ("shiny_new_field", 1, "shiny_new_field"),
])
def test_config_rejects_unsupported(field, value, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[")):
        TransformerConfig.from_official({**RELEASED_CONFIG, field: value})


def test_released_param_count():
    graphdef, state = abstract_state(TransformerConfig.from_official(RELEASED_CONFIG))
    assert param_count(state) == 1_009_306_624
    # Every parameter carries logical axis names, one per dimension.
    for path, var in nnx.to_flat_state(state):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.get_value().shape), path
    flat = dict(nnx.to_flat_state(state))
    assert flat[("transformer_blocks", 0, "attn", "to_q", "kernel")].get_metadata()["out_sharding"] == (
        "embed", "heads")
    assert flat[("mlm_layer", "conv2", "kernel")].get_metadata()["out_sharding"][-1] == "vocab"
    assert flat[("embed", "embeddings", "embedding")].get_metadata()["out_sharding"] == ("vocab", "embed")


# ----------------------------------------------------------------------------- conversion
def test_converter_rejects_renamed_and_reshaped(tiny_dir, tiny_cfg, tmp_path):
    tensors = load_file(tiny_dir / "transformer.safetensors")
    _, state = abstract_state(tiny_cfg)
    abstract = nnx.to_pure_dict(state)

    renamed = dict(tensors)
    renamed["transformer_blocks.1.attn.to_qq.weight"] = renamed.pop("transformer_blocks.1.attn.to_q.weight")
    save_file(renamed, tmp_path / "renamed.safetensors")
    with pytest.raises(ConversionError) as e:
        convert_tensors(TensorSource([tmp_path / "renamed.safetensors"]), rules(tiny_cfg), abstract)
    assert "transformer_blocks.1.attn.to_qq.weight" in str(e.value)
    assert "transformer_blocks/1/attn/to_q/kernel" in str(e.value)

    reshaped = dict(tensors)
    reshaped["single_transformer_blocks.2.proj_mlp.weight"] = np.zeros((64, 64), np.float32)
    save_file(reshaped, tmp_path / "reshaped.safetensors")
    with pytest.raises(ConversionError) as e:
        convert_tensors(TensorSource([tmp_path / "reshaped.safetensors"]), rules(tiny_cfg), abstract)
    assert "single_transformer_blocks.2.proj_mlp.weight" in str(e.value) and "(64, 64)" in str(e.value)


# ----------------------------------------------------------------------------- pieces
def test_conv_transpose_matches_torch_semantics():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)            # [B, h, w, Cin]
    w_torch = rng.normal(size=(5, 6, 2, 2)).astype(np.float32)      # ConvTranspose2d [in, out, kh, kw]
    want = np.zeros((2, 6, 6, 8), np.float32)                       # NCHW, stride 2, no padding
    for i in range(3):
        for j in range(4):
            want[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2] += np.einsum("bc,couv->bouv", x[:, i, j], w_torch)
    layer = nnx.eval_shape(lambda: ConvTranspose2x2(5, 6, rngs=nnx.Rngs(0)))
    layer.kernel.set_value(jnp.asarray(w_torch.transpose(2, 3, 0, 1)))  # core.conv_transpose layout
    got = np.asarray(layer(jnp.asarray(x)))
    np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), atol=1e-5)


def test_rope_non_square_grid():
    ids = grid_position_ids(2, 3)
    np.testing.assert_array_equal(ids, [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]])
    cos, sin = rope_tables(ids, (4, 6, 6))
    assert cos.shape == sin.shape == (6, 16) and cos.dtype == np.float32
    # Position (0, 1, 2): row axis uses dims 4..9, col axis dims 10..15, pairs repeated.
    freqs = 1.0 / 10000.0 ** (np.arange(0, 6, 2) / 6)
    np.testing.assert_allclose(cos[5, 4:10], np.repeat(np.cos(1 * freqs), 2), rtol=1e-6)
    np.testing.assert_allclose(sin[5, 10:16], np.repeat(np.sin(2 * freqs), 2), rtol=1e-6)
    np.testing.assert_array_equal(cos[:, :4], 1.0)


def test_capture_modes_and_bias():
    rng = np.random.default_rng(1)
    seg = Segments(text=3, image=4, reference=4)
    q = jnp.asarray(rng.normal(size=(2, 2, seg.total, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 2, seg.total, 8)), jnp.float32)
    bias = reference_bias(seg, jnp.log(1.3))
    logits = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(8)
    official = jax.nn.softmax(logits[:, :, :3, :7], axis=-1)[..., 3:]
    used = jax.nn.softmax(logits[:, :, :3] + np.asarray(bias)[:3], axis=-1)[..., 3:7]
    np.testing.assert_allclose(text_to_image_attention(q, k, seg, bias, "official"),
                               np.mean(official, axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(text_to_image_attention(q, k, seg, bias, "model"),
                               np.mean(used, axis=(1, 2)), rtol=1e-5)
    b = np.asarray(bias)
    log_s = np.asarray(jnp.log(1.3))
    assert b[0, 8] == b[8, 0] == b[6, 10] == log_s and b[0, 5] == b[8, 9] == b[4, 2] == 0.0
    assert reference_bias(Segments(3, 4), jnp.log(1.3)) is None
    assert not np.asarray(reference_bias(seg, jnp.log(jnp.float32(1.0)))).any()


# ----------------------------------------------------------------------------- parity
def test_inputs_match_reference(tiny_model, cases):
    """Conditioning vectors and the streams entering the first block."""
    graphdef, state = tiny_model

    @jax.jit
    def inputs(st, pooled, micro, t, txt, ids, ref_ids):
        model = nnx.merge(graphdef, st)
        return {
            "a_dbg_temb": model.conditioning(pooled, micro, t),
            "a_dbg_ref_temb": model.conditioning(pooled, micro, jnp.zeros_like(t)),
            "a_dbg_txt": model.embed_text(txt),
            "a_dbg_img_in": model.embed_image(ids),
            "a_dbg_ref_in": model.embed_image(ref_ids),
        }

    got = inputs(state, *(cases[k] for k in ("a_pooled_projections", "a_micro_conds", "a_timestep",
                                              "a_encoder_hidden_states", "a_ids", "a_ref_ids")))
    report = {name: max_err(ours, cases[name]) for name, ours in got.items()}
    for name, err in report.items():
        assert err <= rule_tol(cases[name]), f"{name}: max abs error {err:.3g}"
    print({k: f"{v:.3g}" for k, v in report.items()})


def test_case_a_parity(forward, cases):
    """Strength 1.0 and 1.1 (one program, traced strength) and no reference stream."""
    report = {}
    s10, _ = forward(*case_a_args(cases), 1.0)
    check_logits(cases, s10, "a_logits_ref_s10", report)
    s11, _ = forward(*case_a_args(cases), float(cases["a_reference_strength_b"]))
    check_logits(cases, s11, "a_logits_ref_s11", report)
    noref, _ = forward(*case_a_args(cases, with_ref=False))
    check_logits(cases, noref, "a_logits_noref", report)
    print({k: f"{v:.3g}" for k, v in report.items()})


def test_case_d_capture_cfg_step0(forward, cases):
    """One CFG forward of the official pipeline run, step 0, with attention capture."""
    n = 2
    ids = np.full((n, 64, 64), int(cases["mask_token_id"]), np.int32)
    ref = np.repeat(cases["d_ref_ids"], n, axis=0)
    txt = np.concatenate([cases["d_negative_encoder_hidden_states"], cases["d_encoder_hidden_states"]])
    pooled = np.concatenate([cases["d_negative_prompt_embeds"], cases["d_prompt_embeds"]])
    micro = np.repeat(cases["d_micro_conds"][None], n, axis=0)
    t = np.full((n,), cases["d_timesteps"][0], np.int32)
    blocks = tuple(int(b) for b in cases["d_attention_blocks"])
    logits, scores = forward(ids, ref, txt, pooled, micro, t, float(cases["d_reference_strength"]),
                             capture_blocks=blocks, capture_mode="official")
    assert scores.shape == (n, len(blocks), 1024) and scores.dtype == np.float32
    ref_scores = cases["d_score_blocks"][0]
    err = max_err(scores[1], ref_scores)                         # conditional half
    assert err <= 1e-4 * np.abs(ref_scores).max(), f"scores: max abs error {err:.3g}"

    report = {"d_score_blocks": err}
    guided = logits[0] + 6.0 * (logits[1] - logits[0])
    rows = cases["logit_rows"]
    for name, ours in [("rows", guided[rows].transpose(2, 0, 1)), ("max", guided.max(-1)),
                       ("lse", logsumexp64(guided))]:
        want = cases[f"d_logits_{name}"][0]
        err = report[f"d_logits_{name}"] = max_err(ours, want)
        assert err <= rule_tol(want), f"d_logits_{name}: max abs error {err:.3g}"
    decided = cases["d_logits_top2gap"][0] >= 1e-4
    assert not ((guided.argmax(-1) != cases["d_logits_argmax"][0]) & decided).any()
    print({k: f"{v:.3g}" for k, v in report.items()})


def test_non_square_grid_and_traced_strength(tiny_model, tiny_cfg):
    """48x64 ids on a 1+1-block model cut from the fixture weights; traced vs python-float strength."""
    _, full = tiny_model
    cfg = dataclasses.replace(tiny_cfg, num_layers=1, num_single_layers=1)
    graphdef, state = abstract_state(cfg)
    pure = nnx.to_pure_dict(full)
    pure["transformer_blocks"] = {0: pure["transformer_blocks"][0]}
    pure["single_transformer_blocks"] = {0: pure["single_transformer_blocks"][0]}
    nnx.replace_by_pure_dict(state, pure)

    rng = np.random.default_rng(0)
    h, w = 48, 64
    ids = rng.integers(0, 65, size=(1, h, w)).astype(np.int32)
    ref = rng.integers(0, 64, size=(1, h, w)).astype(np.int32)
    txt = rng.normal(size=(1, 16, 40)).astype(np.float32)
    pooled = rng.normal(size=(1, 24)).astype(np.float32)
    micro = np.array([[768.0, 1024.0, 0.0, 0.0, 6.0]], np.float32)
    t = np.array([2], np.int32)

    def run(st, s):
        return nnx.merge(graphdef, st)(ids, ref, txt, pooled, micro, t, reference_strength=s,
                                       capture_blocks=(0, 1), capture_mode="model")

    traced = jax.jit(run)
    logits, scores = traced(state, jnp.float32(1.3))
    assert logits.shape == (1, h, w, 64) and logits.dtype == jnp.float32
    assert scores.shape == (1, 2, (h // 2) * (w // 2))
    static_logits, static_scores = jax.jit(lambda st: run(st, 1.3))(state)
    assert max_err(logits, static_logits) <= 1e-6
    assert max_err(scores, static_scores) <= 1e-8
    assert max_err(logits, traced(state, jnp.float32(1.0))[0]) > 1e-3   # the strength is not ignored
    with pytest.raises(ValueError, match="even"):
        nnx.merge(graphdef, state)(ids[:, :47], ref[:, :47], txt, pooled, micro, t)


def test_scanned_blocks_give_the_unrolled_outputs(tiny_model, tiny_cfg, monkeypatch):
    """``scan_blocks=True``: runs of blocks as one ``lax.scan`` over their stacked parameters (a
    captured block alone), the same logits and scores as the block-by-block program. Block 4 (the
    third single block) captures: the two dual blocks and the first two single blocks are scanned."""
    from editmgt_jax.models import transformer as tm

    graphdef, state = tiny_model
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(0, tiny_cfg.vocab_size, (2, 4, 4)), jnp.int32)
    ref = jnp.asarray(rng.integers(0, tiny_cfg.codebook_size, (2, 4, 4)), jnp.int32)
    txt = jnp.asarray(rng.standard_normal((2, 8, tiny_cfg.joint_attention_dim)), jnp.float32)
    pooled = jnp.asarray(rng.standard_normal((2, tiny_cfg.pooled_projection_dim)), jnp.float32)
    micro = jnp.asarray([[64, 64, 0, 0, 6]] * 2, jnp.float32)
    t = jnp.asarray([3, 7], jnp.int32)
    scanned = []
    scan_blocks = tm._scan_blocks
    monkeypatch.setattr(tm, "_scan_blocks", lambda blocks, *a: scanned.append(len(blocks)) or scan_blocks(blocks, *a))
    outs = []
    for scan in (False, True):
        model = nnx.merge(graphdef, state)
        model.scan_blocks = scan
        g, st = nnx.split(model)

        def f(st, *a):
            return nnx.merge(g, st)(*a, reference_strength=jnp.float32(1.3), capture_blocks=(4,),
                                    capture_mode="model")

        outs.append(jax.jit(f)(st, ids, ref, txt, pooled, micro, t))
        assert scanned == ([2, 2] if scan else [])
    np.testing.assert_allclose(np.asarray(outs[1][0]), np.asarray(outs[0][0]), rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(outs[1][1]), np.asarray(outs[0][1]), rtol=0, atol=1e-6)
    assert float(np.max(np.abs(np.asarray(outs[0][0])))) > 0.1
