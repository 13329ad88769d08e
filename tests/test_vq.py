"""VQ tokenizer: parity with the official diffusers VQModel (fixture cases b and d), conversion,
configuration, input checks and the straight-through training forward."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from safetensors.numpy import save_file

from editmgt_jax.convert.core import ConversionError, TensorSource, convert_tensors, flatten_abstract
from editmgt_jax.convert.vq import rules
from editmgt_jax.models.layers import param_count
from editmgt_jax.models.vq import RELEASED_CONFIG, FiniteScalarQuantizer, VQConfig, VQModel
from editmgt_jax.models.vq_layers import MidBlockAttention


def tolerance(ref: np.ndarray) -> float:
    """The fixture MANIFEST's rule: 1e-4 * max(1, max |ref|)."""
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


def abstract_state(cfg: VQConfig):
    return nnx.split(nnx.eval_shape(lambda: VQModel(cfg, rngs=nnx.Rngs(0))))


def convert(cfg: VQConfig, files) -> dict:
    _, state = abstract_state(cfg)
    return convert_tensors(TensorSource(files), rules(cfg), state.to_pure_dict(), component="vq")


def official_tensors(tiny_dir) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    with safe_open(str(tiny_dir / "vqvae.safetensors"), framework="np") as h:
        return {k: h.get_tensor(k) for k in h.keys()}


@pytest.fixture(scope="module")
def tiny_cfg(tiny_dir) -> VQConfig:
    return VQConfig.from_official(json.loads((tiny_dir / "vqvae_config.json").read_text()))


@pytest.fixture(scope="module")
def tiny_vq(tiny_dir, tiny_cfg):
    """(graphdef, state) of the fixture VQ with the converted official weights."""
    graphdef, state = abstract_state(tiny_cfg)
    params = convert(tiny_cfg, [tiny_dir / "vqvae.safetensors"])
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return graphdef, state


@pytest.fixture(scope="module")
def vq(tiny_vq) -> dict:
    """Jitted ``encode``, ``quantize``, ``decode_ids`` of the fixture VQ (numpy out)."""
    graphdef, state = tiny_vq

    def make(method):
        fn = jax.jit(lambda s, x: getattr(nnx.merge(graphdef, s), method)(x))
        return lambda x: np.asarray(fn(state, x))

    return {m: make(m) for m in ("encode", "quantize", "decode_ids")}


# ----------------------------------------------------------------------------- configuration
def test_tiny_config_and_round_trip(tiny_cfg):
    assert tiny_cfg.block_out_channels == (8, 8, 8, 8, 8)
    assert (tiny_cfg.layers_per_block, tiny_cfg.norm_num_groups, tiny_cfg.latent_channels) == (1, 4, 4)
    assert (tiny_cfg.num_vq_embeddings, tiny_cfg.codebook_dim) == (64, 4)
    assert tiny_cfg.mid_block_add_attention is False
    assert tiny_cfg.downsample_factor == 16
    assert tiny_cfg.beta == 0.25
    assert VQConfig.from_dict(json.loads(json.dumps(tiny_cfg.to_dict()))) == tiny_cfg


def test_released_config_builds_abstractly_with_published_size():
    cfg = VQConfig.from_official(RELEASED_CONFIG)
    assert cfg.downsample_factor == 16 and cfg.codebook_dim == 64
    graphdef, state = abstract_state(cfg)
    assert param_count(state) == 146_244_675
    model = nnx.merge(graphdef, state)
    assert len(model.encoder.down_blocks) == 5 and model.encoder.down_blocks[4].downsamplers is None
    assert all(len(b.resnets) == 3 for b in model.decoder.up_blocks)
    assert model.decoder.up_blocks[4].upsamplers is None
    assert model.quantize.embedding.embedding.shape == (8192, 64)


def test_every_parameter_has_logical_axes(tiny_cfg):
    _, state = abstract_state(VQConfig(**{**tiny_cfg.to_dict(), "mid_block_add_attention": True}))
    shapes = flatten_abstract(state.to_pure_dict())
    specs = flatten_abstract(nnx.get_partition_spec(state).to_pure_dict())
    assert set(shapes) == set(specs)
    for path, leaf in shapes.items():
        names = tuple(specs[path])
        assert len(names) == len(leaf.shape) and all(isinstance(n, str) for n in names), path
        if path[-1] == "kernel" and len(leaf.shape) == 4:
            assert names == ("kernel", "kernel", "conv_in", "conv_out"), path
        if path[-1] == "scale":
            assert names == ("norm",), path
    assert tuple(specs[("quantize", "embedding", "embedding")]) == ("vocab", "embed")
    assert tuple(specs[("decoder", "mid_block", "attentions", 0, "to_q", "kernel")]) == ("embed", "heads")


@pytest.mark.parametrize("change, words", [
    ({"norm_type": "spatial"}, ["norm_type", "spatial"]),
    ({"down_block_types": ["AttnDownEncoderBlock2D"] + ["DownEncoderBlock2D"] * 4},
     ["down_block_types", "AttnDownEncoderBlock2D"]),
    ({"up_block_types": ["UpDecoderBlock2D"] * 4}, ["4 up block types", "5 block_out_channels"]),
    ({"act_fn": "softsign"}, ["act_fn", "softsign"]),
    ({"norm_num_groups": 48}, ["norm_num_groups 48"]),
    ({"_class_name": "AutoencoderKL"}, ["AutoencoderKL"]),
    ({"double_z": True}, ["double_z"]),
])
def test_from_official_rejects_unsupported_values(change, words):
    with pytest.raises(ValueError) as info:
        VQConfig.from_official({**RELEASED_CONFIG, **change})
    for w in words:
        assert w in str(info.value)


def test_from_official_defaults_follow_diffusers():
    cfg = VQConfig.from_official({"block_out_channels": [32, 64], "norm_num_groups": 8,
                                  "down_block_types": ["DownEncoderBlock2D"] * 2,
                                  "up_block_types": ["UpDecoderBlock2D"] * 2})
    assert cfg.mid_block_add_attention is True      # diffusers default when the key is absent
    assert (cfg.layers_per_block, cfg.latent_channels, cfg.num_vq_embeddings) == (1, 3, 256)
    assert cfg.downsample_factor == 2


# ----------------------------------------------------------------------------- parity
def test_case_b_parity(vq, cases):
    image = cases["b_image"].transpose(0, 2, 3, 1)                      # NCHW -> NHWC
    latents = vq["encode"](image)
    ref = cases["b_latents"]
    assert latents.shape == (1, 8, 8, 4)
    err = np.abs(latents.transpose(0, 3, 1, 2) - ref).max()
    assert err <= tolerance(ref), err                                    # observed 2.7e-06

    ids = vq["quantize"](latents)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, cases["b_ids"])

    decoded = vq["decode_ids"](cases["b_ids"])
    ref = cases["b_decoded"]
    assert decoded.shape == (1, 128, 128, 3)
    err = np.abs(decoded.transpose(0, 3, 1, 2) - ref).max()
    assert err <= tolerance(ref), err                                    # observed 9.1e-06


def test_case_d_source_parity(vq, tiny_dir, cases):
    with Image.open(tiny_dir / "source.png") as im:
        pixels = np.asarray(im.convert("RGB"), np.float32)[None] / 255.0
    assert pixels.shape == (1, 1024, 1024, 3)
    latents = vq["encode"](pixels)
    ref = cases["d_ref_latents"]
    err = np.abs(latents.transpose(0, 3, 1, 2) - ref).max()
    assert err <= tolerance(ref), err                                    # observed 1.0e-05
    np.testing.assert_array_equal(vq["quantize"](latents), cases["d_ref_ids"])


def test_quantize_is_the_nearest_codeword(tiny_vq, vq, cases):
    graphdef, state = tiny_vq
    codebook = np.asarray(nnx.merge(graphdef, state).quantize.codebook, np.float64)
    latents = cases["d_ref_latents"].transpose(0, 2, 3, 1).astype(np.float64)
    dist = np.linalg.norm(latents[..., None, :] - codebook, axis=-1)
    np.testing.assert_array_equal(np.argmin(dist, axis=-1), cases["d_ref_ids"])
    np.testing.assert_array_equal(vq["quantize"](latents.astype(np.float32)),
                                  cases["d_ref_ids"])


# ----------------------------------------------------------------------------- conversion errors
def test_converter_names_renamed_and_reshaped_keys(tiny_dir, tiny_cfg, tmp_path):
    tensors = official_tensors(tiny_dir)
    tensors["encoder.conv_inn.weight"] = tensors.pop("encoder.conv_in.weight")
    tensors["decoder.conv_out.weight"] = tensors["decoder.conv_out.weight"].reshape(8, 3, 3, 3)
    path = tmp_path / "broken.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ConversionError) as info:
        convert(tiny_cfg, [path])
    msg = str(info.value)
    assert "encoder.conv_inn.weight" in msg                 # unmapped official key
    assert "encoder/conv_in/kernel" in msg                  # our parameter left empty
    assert "decoder.conv_out.weight" in msg and "(8, 3, 3, 3)" in msg


def test_mid_block_attention_conversion_and_math(tiny_dir, tiny_cfg, tmp_path):
    cfg = VQConfig(**{**tiny_cfg.to_dict(), "mid_block_add_attention": True})
    rng = np.random.default_rng(0)
    tensors = official_tensors(tiny_dir)
    for part in ("encoder", "decoder"):
        p = f"{part}.mid_block.attentions.0."
        for name in ("to_q", "to_k", "to_v", "to_out.0"):
            tensors[p + name + ".weight"] = rng.normal(size=(8, 8)).astype(np.float32)
            tensors[p + name + ".bias"] = rng.normal(size=(8,)).astype(np.float32)
        tensors[p + "group_norm.weight"] = rng.normal(size=(8,)).astype(np.float32)
        tensors[p + "group_norm.bias"] = rng.normal(size=(8,)).astype(np.float32)
    path = tmp_path / "vq_attn.safetensors"
    save_file(tensors, str(path))
    params = convert(cfg, [path])
    attn = params["decoder"]["mid_block"]["attentions"][0]
    sd = {k[len("decoder.mid_block.attentions.0."):]: v for k, v in tensors.items()
          if k.startswith("decoder.mid_block.attentions.0.")}
    np.testing.assert_array_equal(attn["to_q"]["kernel"], sd["to_q.weight"].T)
    np.testing.assert_array_equal(attn["group_norm"]["scale"], sd["group_norm.weight"])

    # The block against the official computation written in numpy (NCHW, [out, in] linears).
    module = nnx.eval_shape(lambda: MidBlockAttention(8, cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(module)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, attn))
    x = rng.normal(size=(2, 8, 4, 5)).astype(np.float32)                # NCHW
    got = np.asarray(nnx.merge(graphdef, state)(jnp.asarray(x.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)

    b, c, h, w = x.shape
    g = x.astype(np.float64).reshape(b, 4, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-6)
    g = g.reshape(b, c, h * w) * sd["group_norm.weight"][:, None] + sd["group_norm.bias"][:, None]
    t = g.transpose(0, 2, 1)                                             # [B, HW, C]
    q, k, v = (t @ sd[n + ".weight"].T + sd[n + ".bias"] for n in ("to_q", "to_k", "to_v"))
    logits = q @ k.transpose(0, 2, 1) / np.sqrt(c)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = (probs @ v) @ sd["to_out.0.weight"].T + sd["to_out.0.bias"]
    want = x + out.transpose(0, 2, 1).reshape(b, c, h, w)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- input checks
def test_encode_rejects_sizes_not_multiple_of_factor(tiny_vq):
    model = nnx.merge(*tiny_vq)
    with pytest.raises(ValueError, match=r"100x128.*downsample factor 16"):
        model.encode(jnp.zeros((1, 100, 128, 3)))
    with pytest.raises(ValueError, match=r"128x120.*downsample factor 16"):
        model.encode_ids(jnp.zeros((1, 128, 120, 3)))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        model.encode(jnp.zeros((1, 32, 32, 4)))


def test_decode_ids_out_of_range_is_nan(vq):
    assert np.isnan(vq["decode_ids"](np.full((1, 8, 8), 64, np.int32))).all()


# ----------------------------------------------------------------------------- training forward
def random_state(cfg: VQConfig, seed: int = 0):
    """(graphdef, state) with random weights filled in numpy: no per-shape initialiser compiles."""
    graphdef, state = abstract_state(cfg)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "scale":
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(leaf.shape), jnp.float32)
        if name == "bias":
            return jnp.asarray(0.1 * rng.standard_normal(leaf.shape), jnp.float32)
        fan_in = int(np.prod(leaf.shape[:-1])) if name == "kernel" else 4
        return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), jnp.float32)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, state.to_pure_dict()))
    return graphdef, state


def test_straight_through_forward_and_gradients():
    # Two stages with a channel change: also exercises conv_shortcut, which the fixture VQ lacks.
    cfg = VQConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                   num_vq_embeddings=16)
    graphdef, state = random_state(cfg)
    x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3))

    def loss_fn(s, x, vq_weight):
        model = nnx.merge(graphdef, s)
        recon, aux, ids = model(x)
        checks = (model.encode(x), model.decode_ids(ids))
        return jnp.mean(jnp.square(recon - x)) + vq_weight * aux["vq_loss"], (recon, aux, ids, checks)

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (_, (recon, aux, ids, (latents, decoded))), g_full = step(state, x, 1.0)
    assert recon.shape == (2, 8, 8, 3) and ids.shape == (2, 4, 4) and ids.dtype == jnp.int32
    # Forward values: the reconstruction is the decode of the chosen codewords.
    np.testing.assert_allclose(recon, decoded, atol=1e-5)
    codebook = np.asarray(nnx.merge(graphdef, state).quantize.codebook)
    mse = np.mean((codebook[np.asarray(ids)] - np.asarray(latents)) ** 2)
    np.testing.assert_allclose([aux["commitment"], aux["codebook"]], [mse, mse], rtol=1e-5)
    np.testing.assert_allclose(aux["vq_loss"], 1.25 * mse, rtol=1e-5)

    grads = flatten_abstract(g_full.to_pure_dict())
    assert all(np.isfinite(np.asarray(v)).all() for v in grads.values())
    for path in [("encoder", "conv_in", "kernel"),
                 ("encoder", "down_blocks", 1, "resnets", 0, "conv_shortcut", "kernel"),
                 ("decoder", "conv_out", "kernel")]:
        assert np.abs(np.asarray(grads[path])).sum() > 0, path
    g_code = np.asarray(grads[("quantize", "embedding", "embedding")])
    used = np.unique(np.asarray(ids))
    assert np.abs(g_code[used]).sum() > 0
    assert np.abs(np.delete(g_code, used, axis=0)).max() == 0      # only chosen codewords move
    # Without the VQ loss the encoder still learns through the straight-through estimator,
    # and the codebook gets nothing.
    _, g_rec = step(state, x, 0.0)
    g_rec = flatten_abstract(g_rec.to_pure_dict())
    assert np.abs(np.asarray(g_rec[("encoder", "conv_in", "kernel")])).sum() > 0
    assert np.abs(np.asarray(g_rec[("quantize", "embedding", "embedding")])).max() == 0


# ----------------------------------------------------------------------------- finite scalar quantisation
def _fsq_cfg(**kw):
    base = dict(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                num_vq_embeddings=60, quantizer="fsq", fsq_levels=(4, 3, 5))
    base.update(kw)
    return VQConfig(**base)


def test_fsq_ids_codes_and_round_trip():
    cfg = _fsq_cfg()
    assert cfg.codebook_dim == 3
    assert VQConfig.from_dict(cfg.to_dict()) == cfg
    q = FiniteScalarQuantizer(cfg.fsq_levels)
    codes = np.asarray(q.codebook)
    # Every id has a distinct code; per channel the levels are (-half .. levels-1-half) / half.
    assert codes.shape == (60, 3) and len({tuple(c) for c in codes}) == 60
    np.testing.assert_allclose(sorted(set(codes[:, 0])), [-1.0, -0.5, 0.0, 0.5])
    np.testing.assert_allclose(sorted(set(codes[:, 1])), [-1.0, 0.0, 1.0])
    # Latents that map exactly onto a code (inverse of the tanh bound) give back its id.
    levels = np.asarray(cfg.fsq_levels, np.float64)
    half_l = (levels - 1) * (1 + q.EPS) / 2
    offset = np.where(levels % 2 == 0, 0.5, 0.0)
    rounded = codes * (levels // 2)
    z = np.arctanh((rounded + offset) / half_l) - np.arctanh(offset / half_l)
    codes_st, ids = q.straight_through(jnp.asarray(z, jnp.float32))
    np.testing.assert_array_equal(np.asarray(ids), np.arange(60))
    np.testing.assert_allclose(np.asarray(codes_st), codes, atol=1e-6)
    assert np.isnan(np.asarray(q.lookup(jnp.asarray([60, -1])))).all()
    # Straight-through: rounding passes the tanh bound's gradient.
    g = jax.grad(lambda x: jnp.sum(q.straight_through(x)[0]))(jnp.zeros((3,)))
    assert np.all(np.asarray(g) > 0)


def test_fsq_model_forward_matches_decode_ids():
    cfg = _fsq_cfg()
    model = VQModel(cfg, rngs=nnx.Rngs(0))
    pixels = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3))
    recon, aux, ids = model(pixels)
    assert ids.shape == (2, 4, 4) and int(ids.max()) < 60 and int(ids.min()) >= 0
    np.testing.assert_array_equal(np.asarray(model.encode_ids(pixels)), np.asarray(ids))
    np.testing.assert_allclose(np.asarray(model.decode_ids(ids)), np.asarray(recon), atol=1e-5)
    assert float(aux["codebook"]) == 0.0 and float(aux["commitment"]) == 0.0
    assert not nnx.state(model.quantize, nnx.Param)   # no codebook parameters


@pytest.mark.parametrize("kw, message", [
    (dict(num_vq_embeddings=64), "product of fsq_levels"),
    (dict(fsq_levels=(4, 1, 5), num_vq_embeddings=20), "each >= 2"),
    (dict(quantizer="rq"), "quantizer"),
    (dict(quantizer="vq"), "fsq_levels is set"),
])
def test_fsq_config_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        _fsq_cfg(**kw)


def test_patch_encoder_ids_are_local():
    """With encoder="patch" an id depends on its own f x f patch only: pixels changed inside one
    patch re-code that position and no other, and the conv encoder does not have this property."""
    cfg = _fsq_cfg(encoder="patch")
    assert VQConfig.from_dict(cfg.to_dict()) == cfg
    pixels = np.asarray(jax.random.uniform(jax.random.key(2), (1, 16, 16, 3)))
    edited = pixels.copy()
    edited[0, 4:8, 8:12] = 1.0 - edited[0, 4:8, 8:12]         # latent cells (2..3, 4..5), f = 2
    changed = {}
    for kind in ("patch", "conv"):
        model = VQModel(_fsq_cfg(encoder=kind), rngs=nnx.Rngs(0))
        a = np.asarray(model.encode(jnp.asarray(pixels)))
        b = np.asarray(model.encode(jnp.asarray(edited)))
        changed[kind] = np.argwhere(np.abs(a - b).max(-1)[0] > 1e-6)
    assert set(map(tuple, changed["patch"])) <= {(2, 4), (2, 5), (3, 4), (3, 5)}
    assert len(changed["patch"]) >= 1
    assert len(changed["conv"]) > len(changed["patch"])
    # A patch encoder trains and decodes like the conv one.
    model = VQModel(cfg, rngs=nnx.Rngs(0))
    recon, _, ids = model(jnp.asarray(pixels))
    np.testing.assert_allclose(np.asarray(model.decode_ids(ids)), np.asarray(recon), atol=1e-5)
    with pytest.raises(ValueError, match="encoder 'resnet'"):
        _fsq_cfg(encoder="resnet")
