"""The bf16 path (bf16 parameters and matmuls; norm statistics, softmax and logits in float32) against
the fixture's float32 outputs, module by module (check_reference's cases a, b and c), with tolerances
about 1.4x what the bf16 path measures (most of it the rounding of the weights to bf16).

Not yet sensitive enough: with the attention logits rounded to bf16 in the xla core, the
transformer's errors here came out unchanged (to every printed digit), so these bounds do not catch
that change; why the rounding did not reach the transformer's logits is open."""

import numpy as np
import pytest

from editmgt_jax.tools import check_reference as cr

FIXTURE = __import__("pathlib").Path(__file__).parent / "fixtures" / "editmgt-tiny-v1"

# Error relative to max(1, max |ref|) (what float_check's 1e-4 tolerance is relative to); for the
# argmax checks the fraction of positions that differ (near-ties skipped). Measured bf16 errors in
# comments (tiny-v1 fixture, CPU).
TOLERANCE = {
    "rows": 0.025,     # measured 0.015 to 0.018
    "max": 0.016,      # measured 0.012
    "lse": 0.0015,     # measured 0.0009 to 0.0010
    "argmax": 0.015,   # measured 0.9% to 1.15% of 8192
}


@pytest.fixture(scope="module")
def bf16_results():
    import jax
    import jax.numpy as jnp

    from editmgt_jax.convert import COMPONENTS, load_fixture_component
    from editmgt_jax.convert.registry import instantiate

    cfg, params = load_fixture_component(str(FIXTURE), COMPONENTS["transformer"])
    tr = instantiate(COMPONENTS["transformer"], cfg,
                     jax.tree.map(lambda a: np.asarray(a).astype(jnp.bfloat16), params), dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(nnx_state(tr))} == {jnp.dtype(jnp.bfloat16)}
    with np.load(FIXTURE / "cases.npz") as z:
        cases = {k: z[k] for k in z.files}
    return {r.name: r for r in cr.case_a({"transformer": tr}, cases)}, cases


def nnx_state(m):
    from flax import nnx

    return nnx.state(m, nnx.Param)


@pytest.mark.parametrize("prefix", ["a_logits_ref_s10", "a_logits_ref_s11", "a_logits_noref"])
def test_bf16_transformer_against_float32_fixture(bf16_results, prefix):
    results, cases = bf16_results
    for kind, tol in TOLERANCE.items():
        r = results[f"{prefix}_{kind}"]
        if kind == "argmax":
            frac = r.err / cases[f"{prefix}_argmax"].size
            assert 0 <= frac <= tol, (r.name, frac)
        else:
            rel = r.err / (r.tol / 1e-4)     # float_check: tol = 1e-4 * max(1, max|ref|)
            assert rel <= tol, (r.name, rel)
            assert rel > 1e-4, (r.name, rel)  # bf16 really ran (float32 would be under 1e-5)


# The other modules in bf16 (check_reference's cases b and c): error relative to max(1, max |ref|),
# or the fraction of ids that differ; measured values in comments (tiny-v1 fixture, CPU).
MODULE_TOLERANCE = {
    "b_latents": 0.045,                 # measured 0.029
    "b_ids": 0.06,                      # 2 of 64
    "b_decoded": 0.085,                 # 0.056
    "d_ref_latents": 0.08,              # 0.051
    "d_ref_ids": 0.09,                  # 249 of 4096
    "c_clip_text_embeds": 0.013,        # 0.0085
    "c_clip_last_hidden_state": 0.016,  # 0.0105
    "c_gemma_hidden_states_m2": 0.11,   # 0.072
    "c_gemma_hidden_states": 0.14,      # 0.094
}


@pytest.mark.slow
def test_bf16_vq_and_text_encoders_against_float32_fixture():
    import jax
    import jax.numpy as jnp

    from editmgt_jax.convert import COMPONENTS, load_fixture_component
    from editmgt_jax.convert.registry import instantiate

    models = {}
    for name in ("vq", "clip", "gemma"):
        cfg, params = load_fixture_component(str(FIXTURE), COMPONENTS[name])
        models[name] = instantiate(COMPONENTS[name], cfg,
                                   jax.tree.map(lambda a: np.asarray(a).astype(jnp.bfloat16), params),
                                   dtype=jnp.bfloat16)
    with np.load(FIXTURE / "cases.npz") as z:
        cases = {k: z[k] for k in z.files}
    with jax.default_matmul_precision("highest"):
        results = {r.name: r for r in cr.case_b(models, cases, str(FIXTURE)) + cr.case_c(models, cases)}
    assert set(results) == set(MODULE_TOLERANCE)
    for name, tol in MODULE_TOLERANCE.items():
        r = results[name]
        if r.tol == 0:   # an id check: the share that differ
            size = cases["b_ids" if name == "b_ids" else "d_ref_ids"].size
            assert r.err / size <= tol, (name, r.note)
        else:
            rel = r.err / (r.tol / 1e-4)
            assert 1e-4 < rel <= tol, (name, rel)
