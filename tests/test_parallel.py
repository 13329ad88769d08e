"""Mesh construction and logical-axis sharding rules."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from editmgt_jax import parallel
from editmgt_jax.models.layers import Linear


def test_make_mesh_fills_minus_one():
    mesh = parallel.make_mesh({"data": 2, "fsdp": -1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_make_mesh_errors_name_the_problem():
    with pytest.raises(ValueError, match="needs 16 devices"):
        parallel.make_mesh({"data": 16})
    with pytest.raises(ValueError, match="unknown axis"):
        parallel.make_mesh({"model": 2})
    with pytest.raises(ValueError, match="at most one axis"):
        parallel.make_mesh((-1, -1, 1))
    with pytest.raises(ValueError, match="expected AXIS=SIZE"):
        parallel.parse_mesh_flag("data8")
    assert parallel.parse_mesh_flag("data=2,tensor=4") == {"data": 2, "tensor": 4}


def test_logical_to_spec_drops_non_dividing_axes_and_reuse():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert parallel.logical_to_spec(("embed", "mlp"), shape=(8, 6), mesh=mesh) == P("fsdp", "tensor")
    # 5 is not divisible by the fsdp size: that dimension stays replicated.
    assert parallel.logical_to_spec(("embed", "mlp"), shape=(5, 6), mesh=mesh) == P(None, "tensor")
    # A mesh axis is used once per array.
    rules = (("a", "tensor"), ("b", "tensor"))
    assert parallel.logical_to_spec(("a", "b"), rules, shape=(4, 4), mesh=mesh) == P("tensor", None)
    assert parallel.logical_to_spec(("batch", None), shape=(8, 3), mesh=mesh) == P(("data", "fsdp"), None)


def test_state_shardings_shard_parameters_and_jit_places_them():
    mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
    model = Linear(16, 32, axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    shardings = parallel.state_shardings(state, mesh)
    pure = nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()
    pure_shardings = jax.tree.map(lambda s: s, shardings.to_pure_dict())
    assert pure_shardings["kernel"].spec == P("fsdp", "tensor")
    assert pure_shardings["bias"].spec == P("tensor")
    placed = jax.device_put(pure, pure_shardings)
    assert placed["kernel"].sharding.spec == P("fsdp", "tensor")
    assert parallel.replicated_fraction(placed, pure_shardings) == 0.0

    @jax.jit
    def apply(p, x):
        st = nnx.State(jax.tree.map(lambda v: v, state))
        nnx.replace_by_pure_dict(st, p)
        return nnx.merge(graphdef, st)(x)

    x = np.ones((4, 16), np.float32)
    np.testing.assert_allclose(apply(placed, x), model(x), rtol=1e-6, atol=1e-6)


def test_gathered_block_call_gives_the_plain_values_and_gradients():
    """A block run through gathered_block_call on an fsdp mesh (gathered for the forward, gathered
    again and recomputed in the backward) gives the plain call's outputs and gradients (parameters
    and inputs), the parameter gradients in the stored layout; a None output passes through."""
    import jax.numpy as jnp

    mesh = parallel.make_mesh({"fsdp": 4}, jax.devices()[:4])
    block = Linear(16, 32, axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(block)
    pure = state.to_pure_dict()
    shardings = parallel.state_shardings(state, mesh).to_pure_dict()
    gather = parallel.module_gatherer(mesh)

    def call(m, x, scale):
        return jnp.tanh(m(x)) * scale, None

    def loss(p, x, scale, gathered):
        st = nnx.State(jax.tree.map(lambda v: v, state))
        nnx.replace_by_pure_dict(st, p)
        f = parallel.gathered_block_call(call, gather) if gathered else call
        y, none = f(nnx.merge(graphdef, st), x, scale)
        assert none is None
        return jnp.sum(y ** 2 * jnp.arange(32))

    x = np.random.RandomState(0).randn(8, 16).astype(np.float32)
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    with jax.default_matmul_precision("highest"):
        ref_loss, ref = step(pure, x, np.float32(1.5), False)
        got_loss, got = step(jax.device_put(pure, shardings), x, np.float32(1.5), True)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, ref)
    assert not got[0]["kernel"].sharding.is_fully_replicated
