"""LoRA fine-tuning: the adapted layer is W + s * (alpha / r) * A @ B, a train step changes only the
adapters (the only trained and checkpointed arrays), and a LoRA run through train.main exports a
model that loads at any scale (0 = the base model exactly)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import train_fixtures
from configs import editor_tiny
from editmgt_jax import checkpoints
from editmgt_jax.models.layers import Linear
from editmgt_jax.models.lora import LoRAConfig, LoRALinear, add_lora, merge_adapters
from editmgt_jax.parallel import DEFAULT_RULES, make_mesh
from editmgt_jax.training.state import TrainProgram

FAST = {"xla_backend_optimization_level": 0}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = train_fixtures.RES


def _flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + (str(k),)))
        else:
            out["/".join(prefix + (str(k),))] = np.asarray(v)
    return out


def test_adapted_layer_and_merge_are_w_plus_scaled_ab():
    cfg = LoRAConfig(rank=4, alpha=16.0)
    rng = np.random.default_rng(0)
    for s in (0.0, 0.5, 1.0, 1.7):
        layer = LoRALinear(6, 5, rank=cfg.rank, scale=s * cfg.scaling, rngs=nnx.Rngs(0))
        a = rng.normal(size=(6, 4)).astype(np.float32)
        b = rng.normal(size=(4, 5)).astype(np.float32)      # nonzero: B starts at zero otherwise
        layer.lora.lora_a[...] = a
        layer.lora.lora_b[...] = b
        w = np.asarray(layer.kernel[...])
        want_kernel = w + s * (16.0 / 4) * a @ b             # torch layout: W + s * alpha/r * B_t @ A_t
        params = {"layer": {"kernel": w, "bias": np.asarray(layer.bias[...]), "lora": {"lora_a": a, "lora_b": b}}}
        merged = merge_adapters(params, cfg, s)["layer"]
        assert sorted(merged) == ["bias", "kernel"]
        np.testing.assert_allclose(np.asarray(merged["kernel"]), want_kernel, rtol=1e-6, atol=1e-6)
        plain = Linear(6, 5, rngs=nnx.Rngs(0))
        plain.kernel[...] = merged["kernel"]
        x = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
        np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(plain(x)), rtol=1e-5, atol=1e-5)


def test_targets_are_the_official_modules_and_unknown_names_fail():
    from editmgt_jax.models.transformer import EditTransformer, TransformerConfig

    tcfg = TransformerConfig(num_layers=1, num_single_layers=2, num_attention_heads=2, attention_head_dim=16,
                             joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
                             vocab_size=65, codebook_size=64, downsample=False)
    model = nnx.eval_shape(lambda: add_lora(EditTransformer(tcfg, rngs=nnx.Rngs(0)), LoRAConfig(rank=4),
                                            rngs=nnx.Rngs(1)))
    adapted = sorted({p.rsplit("/", 2)[0] for p in _flat(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))})
    assert adapted == [f"{blocks}/{i}/attn/{t}" for blocks, n in (("single_transformer_blocks", 2),
                                                                   ("transformer_blocks", 1))
                       for i in range(n) for t in ("to_k", "to_q", "to_v")]
    with pytest.raises(ValueError, match=r"\['to_qq'\] name no linear layer"):
        add_lora(EditTransformer(tcfg, rngs=nnx.Rngs(0)), LoRAConfig(rank=4, targets=("to_q", "to_qq")),
                 rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def data(train_data) -> dict:
    return train_data


def tiny_config(data, base_dir=""):
    c = editor_tiny.get_config()
    c.editor.transformer.num_single_layers = 1
    c.data.update(name=train_fixtures.DATA_NAME, data_dir=data["data_dir"], tokens_dir=data["tokens_dir"],
                  resolution=RES)
    c.editor.image_size = RES
    c.optim.update(learning_rate=1e-2, schedule="constant", warmup_steps=0)
    c.train.update(batch_size=4, num_steps=3, checkpoint_every=3, log_every=1, export=True, loss_plot=False)
    if base_dir:
        c.init_from = str(base_dir)
        c.editor.lora.update(enabled=True, rank=4, alpha=8.0)
    return c


@pytest.fixture(scope="module")
def base_model(data, tmp_path_factory):
    """A tiny editor model checkpoint (random weights, no VQ: the data is pre-tokenised)."""
    from editmgt_jax.training.checkpoint import export_model

    c = tiny_config(data)
    prog = TrainProgram.create(c, make_mesh({"data": 1}), DEFAULT_RULES)
    params, _ = prog.model.init(0, FAST)
    from editmgt_jax.training.tokenizers import make_tokenizer

    out = tmp_path_factory.mktemp("base") / "model"
    return export_model(str(out), c, params, tokenizer=make_tokenizer(c), overwrite=True)


def test_lora_needs_init_from(data):
    c = tiny_config(data)
    c.editor.lora.enabled = True
    with pytest.raises(ValueError, match="set init_from"):
        TrainProgram.create(c, make_mesh({"data": 1}), DEFAULT_RULES)


def test_a_train_step_changes_only_the_adapters(data, base_model):
    from editmgt_jax.data.pipeline import make_dataset
    from editmgt_jax.training.frozen import load_init_params
    from editmgt_jax.training.batches import pipeline_config, prepare_batch
    from editmgt_jax.training.step import global_batch, loss_from_config, make_steps
    from editmgt_jax.training.tokenizers import make_tokenizer

    c = tiny_config(data, base_model)
    mesh = make_mesh({"data": 1})
    prog = TrainProgram.create(c, mesh, DEFAULT_RULES)
    # Trained: the adapters only; their optimizer state: adapter-shaped only.
    assert all("/lora/" in p for p in _flat(prog.model.abstract_params))
    adapter_shapes = sorted(a.shape for a in jax.tree.leaves(prog.model.abstract_params))
    opt_shapes = sorted(a.shape for a in jax.tree.leaves(prog.abstract_state.opt_state) if a.ndim)
    assert opt_shapes == sorted(adapter_shapes * 2)                 # Adam's two moments, nothing else
    state, rest = prog.init_state(0, params=load_init_params(c, prog), compiler_options=FAST)
    before = _flat(jax.device_get(prog.model.all_params(state.params, rest)))
    stored = _flat(checkpoints.load_component(base_model, "transformer"))
    assert all(np.array_equal(before["transformer/" + k], v) for k, v in stored.items())   # base as loaded
    raw = next(iter(make_dataset(pipeline_config(c, "train", 1), tokenize=make_tokenizer(c))))
    batch = global_batch(prepare_batch(raw, c), mesh)
    aux = {"frozen": {}, "rest": rest}
    steps = make_steps(prog, loss_from_config(c), {}, batch, aux, compiler_options=FAST)
    state, metrics = steps.train(state, batch, aux)
    assert bool(metrics["finite"]) and int(state.step) == 1
    after = _flat(jax.device_get(prog.model.all_params(state.params, rest)))
    assert sorted(after) == sorted(before)
    changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
    assert changed and all("/lora/" in k for k in changed), changed[:5]
    assert any(k.endswith("lora_b") for k in changed)               # B left zero: the adapter moved


def test_lora_run_through_train_main(data, base_model, tmp_path):
    wd = tmp_path / "run"
    c = tiny_config(data, base_model)
    flags = [f"--config.{k}={v}" for k, v in (
        ("init_from", base_model), ("editor.lora.enabled", True), ("editor.lora.rank", 4),
        ("editor.lora.alpha", 8.0), ("data.name", c.data.name), ("data.data_dir", c.data.data_dir),
        ("data.tokens_dir", c.data.tokens_dir), ("data.resolution", RES), ("editor.image_size", RES),
        ("editor.transformer.num_single_layers", 1), ("optim.learning_rate", 1e-2),
        ("optim.schedule", "constant"), ("optim.warmup_steps", 0), ("train.batch_size", 4),
        ("train.num_steps", 3), ("train.checkpoint_every", 3), ("train.loss_plot", False))]
    r = subprocess.run([sys.executable, "-m", "train.main", "--config", "configs/editor_tiny.py",
                        "--workdir", str(wd), *flags], cwd=REPO, env=train_fixtures.subprocess_env(1),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    # The training checkpoint holds the adapters and their optimizer state, not the model.
    with open(wd / "checkpoints" / "3" / "state" / "_METADATA") as fh:
        tree = json.load(fh)["tree_metadata"]
    param_keys = [k for k in tree if k.startswith("('params'")]
    assert param_keys and all("'lora'" in k for k in param_keys), param_keys[:3]
    assert not [k for k in tree if "'kernel'" in k or "'embedding'" in k or "'scale'" in k]
    # The exported model: the base with its adapters, merged at the scale asked for.
    model = wd / "model"
    assert checkpoints.read_config(model)["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["to_q", "to_k", "to_v"]}
    stored = _flat(checkpoints.load_component(model, "transformer"))
    base = _flat(checkpoints.load_component(base_model, "transformer"))
    abstract = checkpoints.abstract_module("transformer", checkpoints.read_config(base_model)["components"]["transformer"])
    abstract = nnx.to_pure_dict(nnx.state(abstract))
    at0 = _flat(checkpoints.load_params(model, "transformer", abstract, lora_scale=0.0))
    at2 = _flat(checkpoints.load_params(model, "transformer", abstract, lora_scale=2.0))
    assert sorted(at0) == sorted(base)
    assert all(np.array_equal(at0[k], base[k]) for k in base)          # scale 0: the base model exactly
    for k in base:
        if k.endswith("/kernel") and k.split("/")[-2] in ("to_q", "to_k", "to_v"):   # the adapted layers
            d = k[:-len("kernel")] + "lora/"
            want = base[k] + 2.0 * (8.0 / 4) * stored[d + "lora_a"] @ stored[d + "lora_b"]
            np.testing.assert_allclose(at2[k], want, rtol=1e-6, atol=1e-7)
            assert np.abs(at2[k] - base[k]).max() > 0
        elif "/lora/" not in k:
            assert np.array_equal(at2[k], base[k])
