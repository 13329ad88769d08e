"""Region-hold sampler: case-d step logic against the fixtures, and loop invariants with a fake model."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from editmgt_jax.sampling import schedule
from editmgt_jax.sampling.config import SamplerSettings
from editmgt_jax.sampling.region_hold import per_sample_keys, sample
from editmgt_jax.sampling.step import F32_MAX, hold_mask, remask_lowest, sample_categorical, step_update
from numpy_reference import scipy_adaptive_smooth, torch_bicubic_direct

MASK_D = 64  # case d: codebook 64, mask id 64


# ----------------------------------------------------------------------------- case d step data
def test_schedules_match_fixture(cases):
    np.testing.assert_array_equal(schedule.mask_len_table(4096, 4)[:3], cases["d_mask_len"][:3])
    np.testing.assert_array_equal(schedule.temperature_schedule(4, 2.0, 0.0), cases["d_temperatures"])
    unknown = (cases["d_tokens_before"] == MASK_D).reshape(4, -1).sum(-1)
    ratios = schedule.cosine_mask_ratios(4)
    got = [int(schedule.step_mask_len(4096, ratios[i], jnp.ones(1), jnp.asarray(unknown[i:i + 1]))[0])
           for i in range(3)]
    assert got == [3784, 2896, 1567] == cases["d_mask_len"][:3].tolist()


def test_hold_matches_fixture(cases):
    unknown = (cases["d_tokens_before"] == MASK_D).reshape(4, -1)
    hold = np.asarray(hold_mask(jnp.asarray(unknown), jnp.asarray(cases["d_score_upsampled"]),
                                float(cases["d_local_guidance"])))
    np.testing.assert_array_equal(hold, cases["d_hold"])
    assert hold.sum(-1).tolist() == [3924, 3729, 2886, 1546]


def test_remask_matches_fixture(cases):
    for i in range(3):
        unknown = (cases["d_tokens_before"][i] == MASK_D).reshape(1, -1)
        x0 = cases["d_pred_x0"][i].reshape(1, -1)
        probs = cases["d_selected_probs"][i].reshape(1, -1)
        assert np.all(probs[~unknown] == F32_MAX)
        mask_len = jnp.asarray(cases["d_mask_len"][i:i + 1])
        tokens, remask, cut = remask_lowest(jnp.asarray(x0), jnp.asarray(probs), mask_len, jnp.asarray(unknown),
                                            MASK_D)
        np.testing.assert_array_equal(np.asarray(remask)[0], cases["d_remask"][i])
        np.testing.assert_array_equal(np.asarray(tokens).reshape(64, 64), cases["d_tokens_after"][i])
        assert abs(float(cut[0]) - float(cases["d_cutoff"][i])) < 1e-6
        assert int(np.asarray(remask).sum()) == int(cases["d_mask_len"][i])


def synthetic_logits(cases, i):
    """[1, 64, 64, 64] logits whose softmax gives the fixture's proposal and selected probability."""
    k = 64
    before = cases["d_tokens_before"][i].reshape(-1)
    hold = cases["d_hold"][i]
    x0 = cases["d_pred_x0"][i].reshape(-1)
    ref = cases["d_ref_ids"][0].reshape(-1)
    unknown = before == MASK_D
    logits = np.zeros((4096, k), np.float64)
    if i < 3:
        p = cases["d_selected_probs"][i].astype(np.float64)
        target = np.where(hold, ref, x0)  # held positions: the reference token carries the probability
        for j in np.flatnonzero(unknown):
            probs = np.full(k, (1.0 - p[j]) / (k - 1))
            if hold[j] and 1.0 - p[j] > 1.5 * p[j]:  # put the argmax elsewhere: the hold must override it
                probs[:] = 0.1 * (1.0 - p[j]) / (k - 2)
                probs[(ref[j] + 1) % k] = 0.9 * (1.0 - p[j])
            probs[target[j]] = p[j]
            logits[j] = np.log(np.maximum(probs, 1e-300))
    else:
        logits[np.arange(4096), x0] = 5.0
    return jnp.asarray(logits.reshape(1, 64, 64, k), jnp.float32)


def test_step_update_reproduces_case_d(cases):
    step = jax.jit(functools.partial(step_update, steps=4, mask_id=MASK_D))
    ref = jnp.asarray(cases["d_ref_ids"])
    for i in range(4):
        before = jnp.asarray(cases["d_tokens_before"][i][None])
        hold = hold_mask((before == MASK_D).reshape(1, -1), jnp.asarray(cases["d_score_upsampled"][i][None]),
                         float(cases["d_local_guidance"]))
        tokens, info = step(before, ref, synthetic_logits(cases, i), hold, jnp.int32(i))
        np.testing.assert_array_equal(np.asarray(tokens)[0], cases["d_tokens_after"][i])
        np.testing.assert_array_equal(np.asarray(info["pred_x0"])[0], cases["d_pred_x0"][i])
        np.testing.assert_array_equal(np.asarray(info["hold"])[0], cases["d_hold"][i])
        np.testing.assert_array_equal(np.asarray(info["remask"])[0], cases["d_remask"][i])
        assert int(info["mask_len"][0]) == int(cases["d_mask_len"][i])
        if i < 3:
            assert abs(float(info["cutoff"][0]) - float(cases["d_cutoff"][i])) < 1e-5
            sp = np.asarray(info["selected_probs"])[0]
            np.testing.assert_allclose(sp, cases["d_selected_probs"][i], rtol=1e-5)
        else:
            assert np.isnan(float(info["cutoff"][0])) and np.all(np.isnan(np.asarray(info["selected_probs"])))
    np.testing.assert_array_equal(np.asarray(tokens), cases["d_final_tokens"])


class Replay:
    """Model function replaying case d: the synthetic logits and the captured block scores of each step."""

    def __init__(self, cases):
        self.logits = jnp.concatenate([synthetic_logits(cases, i) for i in range(4)])  # [4, 64, 64, 64]
        self.blocks = jnp.asarray(cases["d_score_blocks"])  # [4, 3, 1024]

    def __call__(self, ids, ref_ids, text, pooled, micro, timestep, *, reference_strength, capture_blocks,
                 capture_mode):
        n = ids.shape[0]
        assert capture_blocks == (2, 3, 4)
        i = 3 - timestep[0]  # the step index counts down
        # both CFG halves get the same logits, so u + g (c - u) = u exactly
        return (jnp.broadcast_to(self.logits[i], (n,) + self.logits.shape[1:]),
                jnp.broadcast_to(self.blocks[i], (n,) + self.blocks.shape[1:]))


def test_loop_replays_case_d(cases):
    cfg, knobs = SamplerSettings(steps=int(cases["d_num_inference_steps"]),
                                 guidance_scale=float(cases["d_guidance_scale"]),
                                 reference_strength=float(cases["d_reference_strength"]),
                                 hold_threshold=float(cases["d_local_guidance"]),
                                 consolidation_blocks=tuple(cases["d_attention_blocks"].tolist()), greedy=True,
                                 mask_token_id=MASK_D).split(record=True)
    model = Replay(cases)
    rec = jax.jit(lambda knobs, ref, *a: sample(model, cfg, knobs, ref, *a, micro_conds=cases["d_micro_conds"]))(
        knobs, cases["d_ref_ids"], cases["d_encoder_hidden_states"], cases["d_prompt_embeds"],
        cases["d_negative_encoder_hidden_states"], cases["d_negative_prompt_embeds"])
    rec = jax.tree.map(np.asarray, rec)
    for k in ("tokens_before", "tokens_after", "pred_x0", "hold", "remask", "mask_len"):
        assert rec[k].shape == cases[f"d_{k}"].shape, k
        np.testing.assert_array_equal(rec[k], cases[f"d_{k}"], err_msg=k)
    for k in ("score_blocks", "score_raw", "score_rescaled", "score_smoothed", "score_upsampled"):
        ref = cases[f"d_{k}"]
        assert rec[k].shape == ref.shape, k
        scale = np.max(np.abs(ref)) if k in ("score_blocks", "score_raw") else max(1.0, np.max(np.abs(ref)))
        assert np.max(np.abs(rec[k] - ref)) <= 1e-4 * scale, k
    np.testing.assert_allclose(rec["cutoff"][:3], cases["d_cutoff"][:3], atol=1e-5)
    assert np.isnan(rec["cutoff"][3])
    np.testing.assert_allclose(rec["selected_probs"][:3], cases["d_selected_probs"][:3], rtol=1e-5)
    np.testing.assert_array_equal(rec["tokens"], cases["d_final_tokens"])
    assert rec["tokens"].dtype == rec["tokens_before"].dtype == rec["mask_len"].dtype == np.int32
    assert rec["hold"].dtype == rec["remask"].dtype == bool and rec["score_upsampled"].dtype == np.float32


# ----------------------------------------------------------------------------- a fake transformer
K, H, W, D, P = 32, 16, 16, 8, 4  # codebook, id grid, text width, pooled width; mask id = K
HS, WS = H // 2, W // 2  # score grid: the transformer downsamples by 2


def fake_apply(params, ids, ref_ids, text, pooled, micro, timestep, *, reference_strength, capture_blocks,
               capture_mode):
    """Deterministic stand-in honouring the model-function contract (parameters as an argument)."""
    assert capture_mode == "official"
    n = ids.shape[0]
    logits = 0.3 * (params["emb"][ids] + params["left"][jnp.roll(ids, 1, axis=2)]
                    + reference_strength * params["ref"][ref_ids] + params["pos"]
                    + (text.mean(1) @ params["txt"] + pooled @ params["pool"])[:, None, None, :]
                    + 0.05 * timestep.astype(jnp.float32)[:, None, None, None]
                    + 1e-3 * micro.sum(-1)[:, None, None, None])
    if not capture_blocks:
        return logits, None
    known = (ids != K).astype(jnp.float32).reshape(n, HS, 2, WS, 2).mean((2, 4)).reshape(n, 1, -1)
    z = (params["pattern"][jnp.asarray(capture_blocks)][None]
         + (text.mean(1) @ params["score_txt"])[:, None, :] + 0.5 * known)
    return logits, 0.01 * (1.0 + jnp.tanh(z))  # positive, ~1e-2 like attention averages


def fake_params(seed=0):
    r = np.random.default_rng(seed)
    shapes = dict(emb=(K + 1, K), left=(K + 1, K), ref=(K, K), pos=(H, W, K), txt=(D, K), pool=(P, K),
                  pattern=(6, HS * WS), score_txt=(D, HS * WS))
    scale = dict(left=0.5, ref=0.8)
    return {k: jnp.asarray(scale.get(k, 1.0) * r.normal(size=s), jnp.float32) for k, s in shapes.items()}


class FakeModel:
    """``fake_apply`` with fixed parameters (hashable, so compiled helpers can be cached per model)."""

    def __init__(self, seed=0):
        self.params = fake_params(seed)

    def __call__(self, *args, **kwargs):
        return fake_apply(self.params, *args, **kwargs)


def make_inputs(seed, b=3):
    r = np.random.default_rng(100 + seed)
    return dict(ref_ids=r.integers(0, K, (b, H, W)).astype(np.int32),
                text_states=r.normal(size=(b, 5, D)).astype(np.float32),
                pooled=r.normal(size=(b, P)).astype(np.float32),
                neg_text_states=r.normal(size=(b, 5, D)).astype(np.float32),
                neg_pooled=r.normal(size=(b, P)).astype(np.float32))


def pick(inputs, i):
    return {k: v[i:i + 1] for k, v in inputs.items()}


MODEL = FakeModel(0)


@functools.lru_cache(maxsize=None)
def compiled(cfg):
    """One compiled sampler per static configuration (shapes re-specialise as jit does); the knobs
    are traced arguments."""
    return jax.jit(lambda knobs, key, inp, mask: sample(MODEL, cfg, knobs, key=key, inpaint_mask=mask, **inp))


def run(settings, inputs, *, key=None, mask=None, record=False):
    cfg, knobs = settings.split(record=record)
    return jax.tree.map(np.asarray, compiled(cfg)(knobs, key, inputs, mask))


@functools.lru_cache(maxsize=None)
def forward(model, blocks, strength):
    return jax.jit(functools.partial(model, reference_strength=strength, capture_blocks=blocks,
                                     capture_mode="official"))


def official_greedy(model, inp, steps, guidance, lam, blocks, strength, mask=None, key=None, temperatures=None):
    """The reference pipeline + scheduler step for one edit, greedy, written plainly in numpy.

    With ``key`` (one sample's typed PRNG key) and ``temperatures`` (``[steps]``): random sampling.
    The random numbers are jax's uniforms from the loop's keys (``fold_in(key, step)``, split into a
    draw key and a noise key); everything made from them is numpy here: the categorical draw by
    inverse CDF (the first token whose cumulative probability reaches ``u * total``) and the
    re-masking confidence ``log p + temperature * gumbel``, ``gumbel = -log(-log u)``."""
    ref = inp["ref_ids"]
    mask_id, n = K, H * W
    if mask is None:
        latents, start = np.full((1, H, W), mask_id, np.int64), np.float32(1.0)
    else:
        latents = np.where(mask, mask_id, ref).astype(np.int64)
        start = np.float32(mask.sum()) / np.float32(mask.size)
    cfg = guidance > 1
    txt = np.concatenate([inp["neg_text_states"], inp["text_states"]]) if cfg else inp["text_states"]
    pooled = np.concatenate([inp["neg_pooled"], inp["pooled"]]) if cfg else inp["pooled"]
    micro = np.tile(np.array([[1024, 1024, 0, 0, 6]], np.float32), (len(txt), 1))
    for i, t in enumerate(range(steps - 1, -1, -1)):
        ids = np.concatenate([latents] * 2) if cfg else latents
        refs = np.concatenate([ref] * 2) if cfg else ref
        logits, scores = forward(model, blocks, strength)(ids.astype(np.int32), refs, txt, pooled, micro,
                                                          np.full((len(ids),), t, np.int32))
        logits = np.asarray(logits)
        if cfg:
            logits = logits[:1] + np.float32(guidance) * (logits[1:] - logits[:1])
        unknown = (latents == mask_id).reshape(1, -1)
        e = np.exp(logits - logits.max(-1, keepdims=True))
        probs = (e / e.sum(-1, keepdims=True)).reshape(1, n, K)
        if key is None:
            draw = probs.argmax(-1)
        else:
            draw_key, noise_key = jax.random.split(jax.random.fold_in(key, i))
            u = np.asarray(jax.random.uniform(draw_key, (H, W, 1), jnp.float32,
                                              minval=np.finfo(np.float32).tiny)).reshape(1, n)
            cum = np.cumsum(probs, -1, dtype=np.float32)
            draw = np.minimum((cum < (u * probs.sum(-1, dtype=np.float32))[..., None]).sum(-1), K - 1)
        x0 = np.where(unknown, draw, latents.reshape(1, -1))
        if lam > 0 and blocks:
            raw = np.asarray(scores)[-1:].mean(1)
            s = (raw - raw.min()) / (raw.max() - raw.min() + np.float32(1e-8))
            up = torch_bicubic_direct(scipy_adaptive_smooth(s.reshape(HS, WS)), H, W).reshape(1, -1)
            x0 = np.where(unknown & (up < lam), ref.reshape(1, -1), x0)
        if t == 0:
            latents = x0.reshape(1, H, W)
            break
        ratio = np.float32(i + 1) / np.float32(steps)
        mask_ratio = start * np.cos(ratio * np.float32(math.pi) / np.float32(2))
        mask_len = int(np.floor(np.float32(n) * mask_ratio))
        sel = np.take_along_axis(probs, x0[..., None], -1)[..., 0]
        sel = np.where(unknown, sel, np.finfo(np.float32).max)
        mask_len = max(1, min(int(unknown.sum()) - 1, mask_len))
        conf = np.log(np.maximum(sel, np.float32(1e-20)))
        if key is not None:
            g = np.asarray(jax.random.uniform(noise_key, (n,), jnp.float32))[None]
            gumbel = -np.log(np.maximum(-np.log(np.maximum(g, np.float32(1e-20))), np.float32(1e-20)))
            conf = conf + np.float32(temperatures[i]) * gumbel
        cut = np.sort(conf, -1)[0, mask_len]
        latents = np.where(conf < cut, mask_id, x0).reshape(1, H, W)
    return latents[0]


# ----------------------------------------------------------------------------- loop invariants
def check_trajectory(rec, tokens, ref, mask_id=K, inpaint=None):
    """Invariants every run satisfies, on [steps, B, ...] records."""
    before, after, x0 = rec["tokens_before"], rec["tokens_after"], rec["pred_x0"]
    b = tokens.shape[0]
    assert not np.any(tokens == mask_id)
    np.testing.assert_array_equal(after[-1], tokens)
    for i in range(before.shape[0]):
        known = before[i] != mask_id
        np.testing.assert_array_equal(after[i][known], before[i][known])  # known tokens never change
        np.testing.assert_array_equal(x0[i][known], before[i][known])
        held = rec["hold"][i].reshape(b, H, W)
        assert not np.any(held & known)
        np.testing.assert_array_equal(x0[i][held], ref[held])  # held proposals are the source token
        remask = rec["remask"][i].reshape(b, H, W)
        np.testing.assert_array_equal(remask, after[i] == mask_id)
        if i + 1 < before.shape[0]:
            np.testing.assert_array_equal(before[i + 1], after[i])
    if inpaint is not None:
        np.testing.assert_array_equal(tokens[~inpaint], ref[~inpaint])


# every step count and both guidance modes, without compiling the whole cross product; lambda = 10 lies
# above every upsampled score (bicubic can overshoot 1), so that run must copy the source everywhere
@pytest.mark.parametrize("steps,guidance,lam", [(1, 3.0, 0.3), (2, 1.0, 10.0), (4, 3.0, 0.3), (12, 1.0, 0.3)])
def test_greedy_matches_numpy_reference(steps, guidance, lam):
    cfg = SamplerSettings(steps=steps, guidance_scale=guidance, reference_strength=1.1, hold_threshold=lam,
                        consolidation_blocks=(1, 3), greedy=True, mask_token_id=K)
    inputs = make_inputs(steps)
    out = run(cfg, inputs, record=True)
    tokens = out["tokens"]
    check_trajectory(out, tokens, inputs["ref_ids"])
    for b in range(3):  # the batch of 3 equals three single edits of the plain reference
        want = official_greedy(MODEL, pick(inputs, b), steps, guidance, lam, (1, 3), 1.1)
        np.testing.assert_array_equal(tokens[b], want)
    if lam > 1:
        assert out["score_upsampled"].max() < lam
        assert out["hold"][0].all()
        np.testing.assert_array_equal(tokens, inputs["ref_ids"])
        return
    # each non-final step leaves exactly mask_len positions masked (greedy, no ties)
    unknown_after = (out["tokens_after"] == K).sum((2, 3))
    np.testing.assert_array_equal(unknown_after[:-1], out["mask_len"][:-1])
    assert np.all(out["mask_len"][-1] == -1)
    np.testing.assert_array_equal(out["mask_len"][:-1, 0], np.maximum(1, schedule.mask_len_table(H * W, steps)[:-1]))
    held = out["hold"].sum(-1)
    assert held.min() > 0 and (out["hold"].size - held.sum()) > 0, "hold should be partial for this test"
    if steps > 2:  # as in the reference, held tokens are revisited when the model doubts them
        assert np.any(out["remask"] & out["hold"])


def full_mask(b):
    return np.ones((b, H, W), bool)


GREEDY_NO_HOLD = SamplerSettings(steps=4, guidance_scale=3.0, greedy=True, mask_token_id=K)


def test_no_hold_departs_from_source():
    inputs = make_inputs(2)
    tokens = run(GREEDY_NO_HOLD, inputs, mask=full_mask(3), record=True)["tokens"]
    assert np.mean(tokens == inputs["ref_ids"]) < 0.2
    for b in range(3):
        np.testing.assert_array_equal(tokens[b], official_greedy(MODEL, pick(inputs, b), 4, 3.0, 0.0, (), 1.1))


# random sampling: these tests share one configuration and always pass [3] keys and a user mask
# (all True = a full edit), so they share one compilation
RANDOM = SamplerSettings(steps=4, guidance_scale=3.0, hold_threshold=0.3, consolidation_blocks=(1, 3), mask_token_id=K)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_sampling_invariants(seed):
    inputs = make_inputs(3)
    out = run(RANDOM, inputs, key=jax.random.split(jax.random.key(seed), 3), mask=full_mask(3), record=True)
    check_trajectory(out, out["tokens"], inputs["ref_ids"])
    # each non-final step leaves exactly mask_len positions masked (Gumbel noise leaves no ties)
    unknown_after = (out["tokens_after"] == K).sum((2, 3))
    np.testing.assert_array_equal(unknown_after[:-1], out["mask_len"][:-1])
    np.testing.assert_array_equal(out["mask_len"][:-1, 0], schedule.mask_len_table(H * W, 4)[:-1])
    other = run(RANDOM, inputs, key=jax.random.split(jax.random.key(seed + 10), 3), mask=full_mask(3),
                record=True)["tokens"]
    assert np.mean(other != out["tokens"]) > 0.1  # the key matters


@pytest.mark.parametrize("t_start,t_end", [(2.0, 0.0), (4.5, 0.5)])
def test_random_sampling_matches_numpy_reference(t_start, t_end):
    """Random sampling (the default decoding) token for token against the numpy reference with the
    same keys and draws, over a temperature schedule (the temperatures are knobs: one compile)."""
    inputs = make_inputs(6)
    keys = jax.random.split(jax.random.key(21), 3)
    settings = dataclasses.replace(RANDOM, temperature_start=t_start, temperature_end=t_end)
    temps = schedule.temperature_schedule(4, t_start, t_end)
    assert len(set(temps.tolist())) == 4 and 1.0 not in temps
    out = run(settings, inputs, key=keys, mask=full_mask(3), record=True)
    for b in range(3):
        want = official_greedy(MODEL, pick(inputs, b), 4, 3.0, 0.3, (1, 3), 1.1, key=keys[b], temperatures=temps)
        np.testing.assert_array_equal(out["tokens"][b], want, err_msg=f"sample {b}")
    # the noise matters: without it (greedy, same draws) the re-masking differs
    greedy_remask = official_greedy(MODEL, pick(inputs, 0), 4, 3.0, 0.3, (1, 3), 1.1, key=keys[0],
                                    temperatures=np.zeros(4, np.float32))
    assert np.mean(greedy_remask != out["tokens"][0]) > 0.05


def test_random_samples_follow_their_own_keys():
    inputs = make_inputs(4)
    keys = jax.random.split(jax.random.key(9), 3)
    full = run(RANDOM, inputs, key=keys, mask=full_mask(3), record=True)
    # swap samples 0 and 1 together with their keys: their results swap, sample 2 is untouched
    order = np.array([1, 0, 2])
    swapped = run(RANDOM, {k: v[order] for k, v in inputs.items()}, key=keys[order], mask=full_mask(3),
                  record=True)
    for k in ("tokens", "tokens_after", "hold", "cutoff"):
        np.testing.assert_array_equal(swapped[k], full[k][:, order] if k != "tokens" else full[k][order])
    # raw uint32 keys name the same streams; one key is split per sample
    np.testing.assert_array_equal(jax.random.key_data(per_sample_keys(jax.random.key_data(keys), 3)),
                                  jax.random.key_data(keys))
    np.testing.assert_array_equal(jax.random.key_data(per_sample_keys(jax.random.key(9), 3)),
                                  jax.random.key_data(keys))


def inpaint_masks():
    mask = np.zeros((3, H, W), bool)
    mask[0, 2:9, 3:12] = True
    mask[1] = np.random.default_rng(5).random((H, W)) < 0.3
    mask[2, :, :5] = True
    return mask


def test_inpainting_keeps_outside_and_scales_schedule():
    inputs, mask = make_inputs(5), inpaint_masks()
    out = run(GREEDY_NO_HOLD, inputs, mask=mask, record=True)
    check_trajectory(out, out["tokens"], inputs["ref_ids"], inpaint=mask)
    np.testing.assert_array_equal(out["tokens_before"][0] == K, mask)
    ratios = schedule.cosine_mask_ratios(4)
    for b in range(3):
        frac = np.float32(mask[b].sum()) / np.float32(H * W)
        want = [max(1, min(int(mask[b].sum()) - 1, int(np.floor(np.float32(H * W) * (frac * ratios[i])))))
                for i in range(3)]
        assert out["mask_len"][:3, b].tolist() == want
        np.testing.assert_array_equal(out["tokens"][b],
                                      official_greedy(MODEL, pick(inputs, b), 4, 3.0, 0.0, (), 1.1, mask[b:b + 1]))


def test_inpainting_with_noise_and_hold():
    inputs, mask = make_inputs(5), inpaint_masks()
    mask[1] = False  # an empty mask changes nothing, even with noise
    out = run(RANDOM, inputs, key=jax.random.split(jax.random.key(3), 3), mask=mask, record=True)
    check_trajectory(out, out["tokens"], inputs["ref_ids"], inpaint=mask)
    np.testing.assert_array_equal(out["tokens"][1], inputs["ref_ids"][1])
    assert not out["remask"][:, 1].any()


def test_freeze_held_tokens_are_final():
    inputs = make_inputs(6)
    cfg = SamplerSettings(steps=6, guidance_scale=3.0, hold_threshold=0.3, consolidation_blocks=(0, 1), greedy=True,
                        freeze_held=True, mask_token_id=K)
    out = run(cfg, inputs, record=True)
    check_trajectory(out, out["tokens"], inputs["ref_ids"])
    ref = inputs["ref_ids"]
    assert out["hold"].any()
    for i in range(6):
        held = out["hold"][i].reshape(3, H, W)
        assert not np.any(out["remask"][i].reshape(3, H, W) & held)
        for j in range(i, 6):  # once held, the source token stays
            np.testing.assert_array_equal(out["tokens_after"][j][held], ref[held])
    # frozen holds leave the schedule: each step re-masks mask_len of the positions that were free
    free = ((out["tokens_before"] == K).reshape(6, 3, -1) & ~out["hold"]).sum(-1)
    np.testing.assert_array_equal(out["remask"][:-1].sum(-1), out["mask_len"][:-1])
    assert np.all(out["mask_len"][:-1] <= np.maximum(free[:-1] - 1, 1))


def test_compiles_once_with_params_as_arguments():
    cfg, knobs = SamplerSettings(steps=3, guidance_scale=2.0, greedy=True, mask_token_id=K).split()
    traces = []

    def apply(params, *args, **kwargs):
        traces.append("model")
        return fake_apply(params, *args, **kwargs)

    @jax.jit
    def edit(params, inp):
        traces.append("edit")
        return sample(functools.partial(apply, params), cfg, knobs, **inp)["tokens"]

    params = fake_params(1)
    first = np.asarray(edit(params, make_inputs(8)))
    for seed in (9, 10):
        edit(params, make_inputs(seed))
    other = np.asarray(edit(fake_params(2), make_inputs(8)))  # new parameter values, same shapes
    again = np.asarray(edit(params, make_inputs(8)))
    # one trace of the whole edit: the model is traced once, in the loop (the mask id comes from the
    # config, so no abstract trace of the model is needed)
    assert traces == ["edit", "model"]
    np.testing.assert_array_equal(again, first)
    assert np.mean(other != first) > 0.5


def test_config_validation():
    with pytest.raises(ValueError, match="consolidation_blocks"):
        SamplerSettings(hold_threshold=0.3)
    with pytest.raises(ValueError, match="steps"):
        SamplerSettings(steps=0)
    with pytest.raises(ValueError, match="PRNG key"):
        sample(MODEL, *SamplerSettings(steps=2, guidance_scale=1.0, mask_token_id=K).split(), **pick(make_inputs(0), 0))
    with pytest.raises(ValueError, match="mask_token_id is not set"):
        SamplerSettings(steps=2, guidance_scale=1.0, greedy=True).split()
    cfg, _ = SamplerSettings(steps=2, greedy=True, mask_token_id=K).split()
    with pytest.raises(ValueError, match=r"\(3,\) temperatures for 2 steps"):   # knobs of another step count
        sample(MODEL, cfg, SamplerSettings(steps=3).knobs(), **pick(make_inputs(0), 0))
    # lists are normalised: the settings and the static config stay hashable
    hash(SamplerSettings(consolidation_blocks=[1, 2], mask_token_id=K).split()[0])


def test_heatmap_is_the_mean_smoothed_score():
    """The returned edit-region map equals the per-step smoothed scores averaged over the steps."""
    import jax.numpy as jnp

    h = w = 8

    def model_fn(ids, ref_ids, text_states, pooled, micro_conds, timestep, *, reference_strength,
                 capture_blocks, capture_mode):
        n = ids.shape[0]
        logits = jnp.sin(jnp.arange(h * w * 5, dtype=jnp.float32).reshape(1, h, w, 5) * 0.37
                         + timestep[:, None, None, None] * 0.1 + ids[..., None] * 0.01)
        if not capture_blocks:
            return jnp.broadcast_to(logits, (n, h, w, 5)), None
        pos = jnp.arange((h // 2) * (w // 2), dtype=jnp.float32)
        scores = jnp.stack([jnp.cos(pos * (b + 1) * 0.3 + timestep[:1] * 0.2) for b in capture_blocks])
        return jnp.broadcast_to(logits, (n, h, w, 5)), jnp.broadcast_to(scores[None] ** 2, (n,) + scores.shape)

    ref = jnp.zeros((2, h, w), jnp.int32)
    txt, pooled = jnp.zeros((2, 3, 4)), jnp.zeros((2, 4))
    settings = SamplerSettings(steps=3, guidance_scale=2.0, greedy=True, consolidation_blocks=(0, 1),
                               hold_threshold=0.5, mask_token_id=5)
    out = sample(model_fn, *settings.split(record=True), ref, txt, pooled, txt, pooled)
    assert out["heatmap"].shape == (2, h // 2, w // 2)
    expect = np.asarray(out["score_smoothed"]).mean(axis=0).reshape(2, h // 2, w // 2)
    np.testing.assert_allclose(np.asarray(out["heatmap"]), expect, rtol=1e-6, atol=1e-7)
    lean = sample(model_fn, *settings.split(), ref, txt, pooled, txt, pooled)
    np.testing.assert_array_equal(np.asarray(lean["heatmap"]), np.asarray(out["heatmap"]))
    assert "heatmap" not in sample(model_fn, *SamplerSettings(steps=2, greedy=True, mask_token_id=5).split(),
                                   ref, txt, pooled, txt, pooled)


def test_sample_categorical_follows_the_distribution():
    """Inverse-CDF draws match the probabilities (K a multiple of the block and not), never a zero."""
    for k, block in ((256, 64), (37, 128)):
        logits = jax.random.normal(jax.random.key(k), (k,)) * 2.0
        probs = jax.nn.softmax(logits).at[3].set(0.0)
        probs = probs / probs.sum()
        n = 40_000
        draws = np.asarray(sample_categorical(jax.random.key(1), jnp.broadcast_to(probs, (n, k)), block))
        counts = np.bincount(draws, minlength=k)
        assert counts[3] == 0 and draws.min() >= 0 and draws.max() < k
        expect = np.asarray(probs) * n
        big = expect > 50
        z = (counts[big] - expect[big]) / np.sqrt(expect[big])
        assert np.max(np.abs(z)) < 5.0, np.max(np.abs(z))
        chi2 = float(np.sum(z ** 2))
        assert chi2 < big.sum() + 6 * np.sqrt(2 * big.sum()), chi2


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_mask_fraction_timestep_is_the_masked_share(guidance):
    """With timestep_convention='mask_fraction' the model sees, per image, the fraction of masked
    tokens of its input (1.0 at the first step, or the inpainting mask's share); 'step_index' feeds
    steps-1 ... 0."""
    h = w = 4
    seen = []

    def model_fn(ids, ref_ids, text_states, pooled, micro_conds, timestep, *, reference_strength,
                 capture_blocks, capture_mode):
        jax.debug.callback(lambda t, i: seen.append((np.asarray(t), np.asarray(i))), timestep, ids)
        logits = jnp.sin(jnp.arange(h * w * 5, dtype=jnp.float32).reshape(1, h, w, 5) * 0.37)
        return jnp.broadcast_to(logits, ids.shape + (5,)), None

    ref = jnp.zeros((2, h, w), jnp.int32)
    txt, pooled = jnp.zeros((2, 3, 4)), jnp.zeros((2, 4))
    inpaint = np.zeros((2, h, w), bool)
    inpaint[0] = True
    inpaint[1, :2] = True
    for conv in ("mask_fraction", "step_index"):
        seen.clear()
        cfg, knobs = SamplerSettings(steps=4, guidance_scale=guidance, greedy=True, mask_token_id=5,
                                     timestep_convention=conv).split()
        out = sample(model_fn, cfg, knobs, ref, txt, pooled, txt, pooled, inpaint_mask=inpaint)
        jax.block_until_ready(out["tokens"])
        assert len(seen) == 4
        for step, (t, ids) in enumerate(seen):
            assert t.shape == (ids.shape[0],)
            if conv == "mask_fraction":
                np.testing.assert_allclose(t, (ids == 5).mean(axis=(1, 2)), rtol=1e-6)
            else:
                np.testing.assert_array_equal(t, 3 - step)
        if conv == "mask_fraction":
            np.testing.assert_allclose(seen[0][0][-2:], [1.0, 0.5])   # the inpainting share at the start
    with pytest.raises(ValueError, match="timestep_convention"):
        SamplerSettings(timestep_convention="release")


def test_a_knob_sweep_compiles_once():
    """Guidance, lambda, reference strength and temperatures are traced arguments: a sweep of 3
    lambdas x 2 guidance scales (then a new strength and temperature) compiles the loop once, every
    knob acts, and a traced run equals the run with the same values compiled in."""
    base = SamplerSettings(steps=3, guidance_scale=2.0, hold_threshold=0.1, consolidation_blocks=(1, 3),
                           mask_token_id=K)
    cfg = base.static()
    traces = []

    @jax.jit
    def edit(knobs, key, inp):
        traces.append(1)   # runs once per trace, i.e. per compilation
        return sample(MODEL, cfg, knobs, key=key, **inp)["tokens"]

    inputs, key = make_inputs(11), jax.random.key(4)
    outs = {}
    for lam in (0.1, 0.4, 0.8):
        for g in (2.0, 5.0):
            s = base.replace(hold_threshold=lam, guidance_scale=g)
            assert s.static() == cfg
            outs[lam, g] = np.asarray(edit(s.knobs(), key, inputs))
    other = base.replace(reference_strength=1.6, temperature_start=0.5, temperature_end=0.1)
    outs["other"] = np.asarray(edit(other.knobs(), key, inputs))
    assert len(traces) == 1 and edit._cache_size() == 1
    assert len({o.tobytes() for o in outs.values()}) == len(outs)   # each value changes the tokens
    knobs = base.replace(hold_threshold=0.4, guidance_scale=5.0).knobs()
    inlined = jax.jit(lambda key, inp: sample(MODEL, cfg, knobs, key=key, **inp)["tokens"])(key, inputs)
    np.testing.assert_array_equal(np.asarray(inlined), outs[0.4, 5.0])


def test_hold_threshold_zero_holds_nothing():
    """lambda = 0 is region hold off inside the one compiled loop: the tokens of a run without
    captured blocks (the same model calls, nothing held)."""
    inputs = make_inputs(12)
    off = run(SamplerSettings(steps=4, guidance_scale=3.0, greedy=True, consolidation_blocks=(1, 3),
                              mask_token_id=K), inputs, record=True)
    assert not off["hold"].any()
    np.testing.assert_array_equal(off["tokens"], run(GREEDY_NO_HOLD, inputs)["tokens"])


def test_keep_source_holds_the_cells_the_model_would_keep():
    """``keep_source``: a still-masked cell whose source token has at least that probability takes
    the source token; the others get the usual proposal; 0 keeps nothing (bit-identical to off)."""
    rng = np.random.default_rng(0)
    k, h, w = 6, 3, 4
    logits = jnp.asarray(rng.standard_normal((1, h, w, k)) * 2, jnp.float32)
    src = jnp.asarray(rng.integers(0, k, (1, h, w)), jnp.int32)
    tokens = jnp.full((1, h, w), k, jnp.int32).at[0, 0, 0].set(int(src[0, 0, 0]))   # one cell known
    probs = np.asarray(jax.nn.softmax(logits, -1))
    p_src = np.take_along_axis(probs, np.asarray(src)[..., None], -1)[..., 0]
    keep = 0.2
    out, info = step_update(tokens, src, logits, None, 0, steps=1, mask_id=k, keep_source=keep)
    expect = np.where(p_src >= keep, np.asarray(src), probs.argmax(-1))
    expect[0, 0, 0] = int(src[0, 0, 0])
    np.testing.assert_array_equal(out, expect)
    held = np.asarray(info["hold"]).reshape(1, h, w)
    np.testing.assert_array_equal(held, (p_src >= keep) & (np.asarray(tokens) == k))
    assert 0 < held.sum() < h * w - 1          # the case tests both kinds of cells
    off, _ = step_update(tokens, src, logits, None, 0, steps=1, mask_id=k)
    zero, _ = step_update(tokens, src, logits, None, 0, steps=1, mask_id=k, keep_source=jnp.float32(0.0))
    np.testing.assert_array_equal(off, zero)
    with pytest.raises(ValueError, match="keep_source"):
        SamplerSettings(steps=2, keep_source=1.5, mask_token_id=k)
