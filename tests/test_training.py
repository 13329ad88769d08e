"""The trainer's pieces: masking rule, condition dropout, optimizer defaults, the small text
encoder, gradient accumulation, and sharded steps that agree with one device.

XLA programs here are compiled with ``xla_backend_optimization_level=0``: the models are tiny, so
compilation dominates and optimisation buys nothing.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import editor_tiny
from editmgt_jax.parallel import make_mesh
from editmgt_jax.training import losses
from editmgt_jax.training.state import TrainProgram, make_lr_schedule, weight_decay_mask
from editmgt_jax.training.step import global_batch, loss_from_config, make_steps

FAST = {"xla_backend_optimization_level": 0}


def small_editor_config(num_single_layers=0, **text):
    c = editor_tiny.get_config()
    c.editor.transformer.num_single_layers = num_single_layers
    c.editor.text.update(text)
    c.optim.learning_rate = 1e-3
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    return c


# ------------------------------------------------------------------------------------------ units


def test_masking_rule():
    draw = jax.jit(lambda ids, target: losses.mask_target_tokens(
        losses.example_keys(jax.random.key(0), ids), target, 99))
    target = jnp.asarray(np.random.RandomState(1).randint(0, 10, (64, 8, 8)), jnp.int32)
    masked, mask, ratio, fraction = draw(jnp.arange(64), target)
    n = mask.reshape(64, -1).sum(1)
    assert (n >= 1).all() and (n <= 64).all()
    # exactly round(cos(pi/2 t) * N) tokens, at least one, and masked ids are the mask id
    np.testing.assert_array_equal(n, np.clip(np.round(np.asarray(ratio) * 64), 1, 64))
    np.testing.assert_allclose(fraction, n / 64)
    assert (masked[mask] == 99).all() and (masked[~mask] == target[~mask]).all()
    # the ratio follows cos(pi/2 t), t ~ U(0,1): mean 2/pi
    assert abs(float(ratio.mean()) - 2 / math.pi) < 0.1
    # per-example keys: the same example id gets the same mask in any batch position
    perm = np.random.RandomState(0).permutation(64)
    _, mask_p, _, _ = draw(jnp.arange(64)[perm], target[perm])
    np.testing.assert_array_equal(mask_p, mask[perm])
    assert losses.training_timestep(ratio, fraction, "release")[0] == pytest.approx(1000 * ratio[0])


def test_full_mask_fraction():
    """``full_mask_prob`` masks that fraction of examples entirely and leaves the others' draws as
    they were."""
    target = jnp.asarray(np.random.RandomState(1).randint(0, 10, (400, 8, 8)), jnp.int32)
    keys = losses.example_keys(jax.random.key(0), jnp.arange(400))
    _, mask0, ratio0, _ = losses.mask_target_tokens(keys, target, 99)
    masked, mask, ratio, fraction = losses.mask_target_tokens(keys, target, 99, full_mask_prob=0.5)
    full = np.asarray(mask.reshape(400, -1).all(1))
    assert 0.4 < full.mean() < 0.6
    np.testing.assert_array_equal(fraction[full], 1.0)
    assert (masked[full] == 99).all()
    # the examples not drawn for a full mask keep the cosine draw of full_mask_prob=0
    np.testing.assert_array_equal(mask[~full], mask0[~full])
    np.testing.assert_array_equal(ratio[~full], ratio0[~full])


def test_code_embedding_init_from_code_patches():
    """``editor.code_embedding_init``: codes that decode alike start with equal embedding rows and
    logits columns, distances between rows follow distances between patches, the mask row and every
    other parameter keep their initialisation, at the default scale."""
    from editmgt_jax.models.vq import VQConfig
    from editmgt_jax.training import code_init
    from editmgt_jax.training.state import vq_model

    k, d = 20, 8
    r = np.random.default_rng(1)
    params = {"transformer": {"embed": {"embeddings": {"embedding": 0.02 * r.standard_normal((k + 1, d))},
                                        "conv": {"kernel": r.standard_normal((1, 1, d, d))}},
                              "mlm_layer": {"conv2": {"kernel": r.standard_normal((1, 1, d, k))}}},
              "text_encoder": {"embed": r.standard_normal((5, d))}}
    params = jax.tree.map(lambda a: a.astype(np.float32), params)
    tr = params["transformer"]
    patches = np.random.default_rng(0).random((k, 12)).astype(np.float32)
    patches[1] = patches[0]
    out = code_init.init_from_code_patches(params, patches, seed=0)
    emb, emb0 = out["transformer"]["embed"]["embeddings"]["embedding"], tr["embed"]["embeddings"]["embedding"]
    ker = out["transformer"]["mlm_layer"]["conv2"]["kernel"][0, 0]
    np.testing.assert_array_equal(emb[0], emb[1])
    np.testing.assert_array_equal(ker[:, 0], ker[:, 1])
    assert not np.allclose(emb[0], emb[2])
    np.testing.assert_array_equal(emb[k:], emb0[k:])          # the mask row
    assert abs(emb[:k].std() / emb0[:k].std() - 1) < 1e-3
    d_patch = np.linalg.norm(patches[:, None] - patches[None], axis=-1).ravel()
    d_emb = np.linalg.norm(emb[:k, None] - emb[None, :k], axis=-1).ravel()
    assert np.corrcoef(d_patch, d_emb)[0, 1] > 0.6
    same = jax.tree.map(np.array_equal, {kk: v for kk, v in out.items() if kk != "transformer"},
                        {kk: v for kk, v in params.items() if kk != "transformer"})
    assert all(jax.tree.leaves(same))
    np.testing.assert_array_equal(out["transformer"]["embed"]["conv"]["kernel"], tr["embed"]["conv"]["kernel"])
    assert not np.array_equal(emb, emb0) and np.array_equal(tr["embed"]["embeddings"]["embedding"], emb0)

    # code_patches: the centre token of a constant grid of each code, decoded
    vcfg = VQConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                    num_vq_embeddings=16)
    from editmgt_jax.training.state import ModelProgram

    prog = ModelProgram.create(lambda rngs: vq_model(vcfg, rngs), make_mesh({"data": 1, "fsdp": 1, "tensor": 1}))
    vq = prog.merge(*prog.init(0, FAST))
    got = code_init.code_patches(vq, 16, chunk=5)
    f = vcfg.downsample_factor
    assert got.shape == (16, f * f * 3)
    full = np.asarray(vq.decode_ids(jnp.full((1, 3, 3), 7, jnp.int32)))[0]
    np.testing.assert_allclose(got[7], full[f:2 * f, f:2 * f].ravel(), atol=1e-5)

def test_balanced_changed_cross_entropy():
    """Each example weighs the same; within one, the changed positions carry ``changed_share``."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((3, 4, 4, 6)), jnp.float32)
    src = jnp.zeros((3, 4, 4), jnp.int32)
    tgt = src.at[0].set(1).at[1, 0, 0].set(2)          # example 0: all changed; 1: one cell; 2: none
    mask = jnp.ones((3, 4, 4), bool).at[1, 3].set(False)
    ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, tgt))
    m = np.asarray(mask)
    e0 = ce[0].mean()
    ch1 = np.zeros((4, 4), bool); ch1[0, 0] = True
    e1 = 0.3 * ce[1][ch1].mean() + 0.7 * ce[1][m[1] & ~ch1].mean()
    e2 = ce[2].mean()
    got = losses.balanced_changed_cross_entropy(logits, src, tgt, mask, 0.3)
    np.testing.assert_allclose(got, (e0 + e1 + e2) / 3, rtol=1e-6)
    # an example with nothing masked does not count
    got = losses.balanced_changed_cross_entropy(logits, src, tgt, mask.at[2].set(False), 0.3)
    np.testing.assert_allclose(got, (e0 + e1) / 2, rtol=1e-6)

def test_condition_dropout_and_masked_ce():
    drop = jax.jit(lambda ids, states, pooled: losses.condition_dropout(
        losses.example_keys(jax.random.key(3), ids), 0.25, (states, pooled),
        (jnp.zeros((1, 4, 3)), jnp.zeros((1, 2)))))
    s, p, dropped = drop(jnp.arange(1000), jnp.ones((1000, 4, 3)), jnp.ones((1000, 2)))
    assert abs(float(dropped.mean()) - 0.25) < 0.05
    np.testing.assert_array_equal(s[dropped], 0)
    np.testing.assert_array_equal(p[~dropped], 1)
    # only masked positions count
    logits = jnp.zeros((1, 2, 2, 4)).at[0, 0, 0, 1].set(100.0)
    target = jnp.array([[[1, 3], [0, 0]]])
    loss, acc = losses.masked_token_cross_entropy(logits, target, jnp.array([[[True, False], [False, False]]]))
    assert float(loss) < 1e-6 and float(acc) == 1.0
    loss, _ = losses.masked_token_cross_entropy(logits, target, jnp.array([[[False, True], [False, False]]]))
    assert float(loss) == pytest.approx(math.log(4), rel=1e-5)


def test_changed_token_weights_and_hits():
    # Position (0, 0) is predicted right (ce ~ 0), (0, 1) is uniform (ce = ln 4); only (0, 1) changed.
    logits = jnp.zeros((1, 2, 2, 4)).at[0, 0, 0, 1].set(100.0)
    target = jnp.array([[[1, 3], [0, 0]]])
    source = jnp.array([[[1, 2], [0, 0]]])
    mask = jnp.array([[[True, True], [False, False]]])
    w = losses.changed_token_weights(source, target, 3.0)
    np.testing.assert_array_equal(w, [[[1.0, 3.0], [1.0, 1.0]]])
    plain, _ = losses.masked_token_cross_entropy(logits, target, mask)
    weighted, acc = losses.masked_token_cross_entropy(logits, target, mask, w)
    assert float(plain) == pytest.approx(math.log(4) / 2, rel=1e-5)
    assert float(weighted) == pytest.approx(3 * math.log(4) / 4, rel=1e-5)
    assert float(acc) == 0.5
    hits, count = losses.changed_token_hits(logits, source, target, mask)
    assert (float(hits), float(count)) == (0.0, 1.0)
    hits, count = losses.changed_token_hits(logits, source, source, mask)   # nothing changed
    assert (float(hits), float(count)) == (0.0, 0.0)


def test_optimizer_defaults_and_schedules():
    c = editor_tiny.get_config()
    params = {"a": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "norm": {"scale": jnp.ones(2)},
              "embed": {"embedding": jnp.ones((4, 2))}}
    mask = weight_decay_mask(params)
    assert mask == {"a": {"kernel": True, "bias": False}, "norm": {"scale": False},
                    "embed": {"embedding": False}}
    from configs import common

    o = common.base().optim
    assert (o.learning_rate, o.b1, o.b2, o.weight_decay, o.grad_clip, o.schedule) == (
        1e-4, 0.9, 0.999, 0.01, 10.0, "constant")
    c.optim.update(schedule="cosine", warmup_steps=10, decay_steps=110, learning_rate=1.0, min_lr_ratio=0.1)
    s = make_lr_schedule(c.optim)
    assert float(s(0)) == 0 and float(s(10)) == pytest.approx(1.0) and float(s(110)) == pytest.approx(0.1)
    c.optim.update(schedule="warmup_constant", warmup_steps=4)
    s = make_lr_schedule(c.optim)
    assert float(s(2)) == pytest.approx(0.5) and float(s(100)) == pytest.approx(1.0)


def test_small_text_encoder():
    from flax import nnx

    from editmgt_jax.models.text.small import SmallTextConfig, SmallTextEncoder

    cfg = SmallTextConfig(vocab_size=20, max_length=8, width=16, num_layers=1, num_heads=2,
                          joint_attention_dim=12, pooled_projection_dim=10)
    enc = SmallTextEncoder(cfg, rngs=nnx.Rngs(0))
    graphdef, weights = nnx.split(enc)
    run = jax.jit(lambda w, i: nnx.merge(graphdef, w)(i))   # one compile instead of op-by-op
    ids = jnp.array([[5, 6, 7, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    states, pooled = run(weights, ids)
    assert states.shape == (2, 6, 12) and pooled.shape == (2, 10)
    assert bool(jnp.isfinite(states).all() & jnp.isfinite(pooled).all())   # empty prompt included
    # padding is invisible to real tokens and to the pooled vector
    s2, p2 = run(weights, jnp.array([[5, 6, 7, 0, 0, 0, 0, 0]]))
    np.testing.assert_allclose(s2[0, :3], states[0, :3], atol=1e-5)
    np.testing.assert_allclose(p2[0], pooled[0], atol=1e-5)
    with pytest.raises(ValueError, match="max_length"):
        enc(jnp.zeros((1, 9), jnp.int32))


# ------------------------------------------------------------------------------ mesh equivalence


def test_mesh_equivalence_and_sharded_params():
    """4 steps on meshes (8,1,1), (2,4,1), (2,2,2) give the single-device losses; params sharded."""
    c = small_editor_config()
    c.optim.grad_accum_steps = 1
    rng = np.random.RandomState(0)
    batches = [dict(source_ids=rng.randint(0, 64, (8, 8, 8)).astype(np.int32),
                    target_ids=rng.randint(0, 64, (8, 8, 8)).astype(np.int32),
                    instruction_ids=rng.randint(0, 118, (8, 24)).astype(np.int32),
                    index=np.arange(8 * i, 8 * i + 8, dtype=np.int32)) for i in range(4)]
    params0 = None
    runs = {}
    for shape in [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]:
        mesh = make_mesh(shape, jax.devices()[: int(np.prod(shape))])
        program = TrainProgram.create(c, mesh)
        if params0 is None:
            params0 = jax.device_get(program.model.init(0, FAST)[0])
        state, rest = program.init_state(0, params=params0, compiler_options=FAST)
        aux = {"rest": rest, "frozen": {}}
        steps = make_steps(program, loss_from_config(c), {}, batches[0], aux, compiler_options=FAST)
        seq = []
        for b in batches:
            state, m = steps.train(state, global_batch(b, mesh), aux)
            seq.append(float(m["loss"]))
        runs[shape] = seq
        if shape[1] * shape[2] > 1:
            frac = program.model.replicated_fraction()
            assert frac < 0.05, f"{shape}: {frac:.1%} of parameter bytes replicated"
            # the parameters really are laid out over several devices
            kernel = state.params["transformer"]["transformer_blocks"][0]["ff"]["proj_in"]["kernel"]
            assert len({str(s.index) for s in kernel.addressable_shards}) == shape[1] * shape[2]
    base = np.array(runs[(1, 1, 1)])
    assert base[-1] < base[0]
    for shape, seq in runs.items():
        np.testing.assert_allclose(seq, base, rtol=2e-5, err_msg=f"mesh {shape}")


def test_replication_check_fails_when_rules_leave_params_replicated():
    c = small_editor_config()
    c.logical_axis_rules = (("batch", ("data", "fsdp")),)   # no rule shards any parameter
    with pytest.raises(ValueError, match="replicated on mesh"):
        from editmgt_jax.training.state import rules_from_config

        TrainProgram.create(c, make_mesh((2, 4, 1)), rules_from_config(c))
    # a data-parallel mesh has nothing to shard parameters over: no complaint
    TrainProgram.create(c, make_mesh((8, 1, 1)), rules_from_config(c))


def test_gradient_accumulation():
    """MultiSteps over two micro-batches: nothing moves after the first, and the update equals one
    step on a batch with the mean gradient (here: the same micro-batch twice). The accumulating
    run also remats the transformer blocks."""
    c = small_editor_config()
    c.editor.cond_dropout = 0.0
    rng = np.random.RandomState(1)
    b = dict(source_ids=rng.randint(0, 64, (4, 8, 8)).astype(np.int32),
             target_ids=rng.randint(0, 64, (4, 8, 8)).astype(np.int32),
             instruction_ids=rng.randint(0, 118, (4, 24)).astype(np.int32),
             index=np.arange(4, dtype=np.int32))
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    out, p0 = {}, None
    for accum in (1, 2):
        c.optim.grad_accum_steps = accum
        c.remat = accum == 2          # block remat recomputes, it must not change the result
        program = TrainProgram.create(c, mesh)
        state, rest = program.init_state(0, params=p0, compiler_options=FAST)
        p0 = jax.device_get(state.params)
        aux = {"rest": rest, "frozen": {}}
        # the masks of an example must not depend on the micro-step it lands in: pin the key
        loss_fn = loss_from_config(c)
        steps = make_steps(program, lambda m, f, bt, k: loss_fn(m, f, bt, jax.random.key(7)), {}, b,
                           aux, compiler_options=FAST)
        for i in range(accum):
            state, _ = steps.train(state, b, aux)
            if i < accum - 1:
                jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), p0)
        out[accum] = jax.device_get(state.params)
    # Remat recomputes each block's forward in the backward (a different fusion, gradients equal to
    # ~1e-7); AdamW's first step divides by |g|, which turns that into up to ~2e-5 on parameters whose
    # gradient is near zero. A missing or doubled update moves parameters by up to the learning rate
    # (1e-3); an update after the first micro-step is checked exactly above.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=5e-5), out[1], out[2])


def test_region_attention_loss_on_a_hand_made_case():
    """KL from the changed-token mask to the block-mean attention: 0 when the attention is spread
    evenly over exactly the changed cells, log(N/|m|) + ... for uniform attention, a gradient that
    moves mass onto the changed cells, examples without a change or with the text dropped ignored."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from editmgt_jax.training import losses

    src = jnp.zeros((3, 4, 4), jnp.int32)
    tgt = src.at[0, 1:3, 1:3].set(5).at[1, 0, 0].set(3)        # example 2: nothing changed
    changed = (src != tgt).reshape(3, 1, 16).astype(jnp.float32)
    exact = jnp.concatenate([changed * 0.2, changed * 0.5], axis=1)[:2]   # two blocks, same shape
    loss, mass = losses.region_attention_loss(exact, src[:2], tgt[:2])
    assert float(loss) == pytest.approx(0.0, abs=1e-6) and float(mass) == pytest.approx(1.0)
    uniform = jnp.full((3, 2, 16), 0.05)
    loss, mass = losses.region_attention_loss(uniform, src, tgt)
    # KL(q || uniform) = log(16 / |m|): log 4 for the 2x2 change, log 16 for the single cell
    assert float(loss) == pytest.approx((np.log(4) + np.log(16)) / 2, rel=1e-5)
    assert float(mass) == pytest.approx((4 / 16 + 1 / 16) / 2, rel=1e-5)
    g = jax.grad(lambda a: losses.region_attention_loss(a, src, tgt)[0])(uniform)
    g0 = np.asarray(g[0, 0]).reshape(4, 4)
    assert (g0[1:3, 1:3] < 0).all() and (np.delete(g0.reshape(-1), [5, 6, 9, 10]) > 0).all()
    assert float(jnp.abs(g[2]).sum()) == 0.0                     # nothing changed: no signal
    weights = jnp.asarray([1.0, 0.0, 1.0])                       # example 1's instruction dropped
    loss_w, _ = losses.region_attention_loss(uniform, src, tgt, weights)
    assert float(loss_w) == pytest.approx(np.log(4), rel=1e-5)
    # a down-sampling transformer: the mask is max-pooled to the 2x2 score grid
    small = jnp.full((1, 1, 4), 0.1)
    loss_d, mass_d = losses.region_attention_loss(small, src[1:2], tgt[1:2])
    assert float(loss_d) == pytest.approx(np.log(4), rel=1e-5) and float(mass_d) == pytest.approx(0.25)
