"""Device meshes and logical-axis sharding rules.

Every parameter carries logical axis names (``nnx.with_partitioning``); a rule table maps them to
mesh axes. Shardings are derived from those names and applied at the single ``jax.jit`` boundary of
each program (train step, sampler), the pjit model.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or None for replicated). Names used by the models:
#   batch: the example axis of activations; embed: model width; mlp: MLP hidden width;
#   heads: attention q/k/v/out feature axis (heads x head_dim); vocab: token vocabulary;
#   conv_in/conv_out: convolution channels; norm: norm scales; kernel: spatial kernel taps.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("norm", None),
    ("kernel", None),
    ("length", None),
)


def make_mesh(shape: Mapping[str, int] | Sequence[int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh. One entry may be -1 to take the remaining devices.

    ``shape`` is a mapping such as ``{"data": 2, "fsdp": 4}`` (missing axes are 1) or a 3-tuple.
    Axes are ``AxisType.Auto`` so plain NNX code (embedding gathers) works under jit shardings.
    """
    devices = list(devices if devices is not None else jax.devices())
    if shape is None:
        dims = [len(devices), 1, 1]
    elif isinstance(shape, Mapping):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh: unknown axis name(s) {sorted(unknown)}; use {MESH_AXES}")
        dims = [int(shape.get(a, 1)) for a in MESH_AXES]
    else:
        dims = [int(d) for d in shape]
        if len(dims) != len(MESH_AXES):
            raise ValueError(f"mesh: expected {len(MESH_AXES)} sizes {MESH_AXES}, got {dims}")
    if dims.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dims}")
    if -1 in dims:
        rest = int(np.prod([d for d in dims if d != -1]))
        if len(devices) % rest:
            raise ValueError(f"mesh: {len(devices)} devices do not divide by {rest} for {dims}")
        dims[dims.index(-1)] = len(devices) // rest
    n = int(np.prod(dims))
    if n > len(devices):
        raise ValueError(f"mesh: shape {dict(zip(MESH_AXES, dims))} needs {n} devices, "
                         f"only {len(devices)} available")
    arr = np.asarray(devices[:n], dtype=object).reshape(dims)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def parse_mesh_flag(text: str) -> dict[str, int]:
    """Parse ``"data=8"`` or ``"data=2,fsdp=4"`` into a mesh shape mapping."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ValueError(f"--mesh: expected AXIS=SIZE entries like 'data=8', got {part!r}")
        name, size = part.split("=", 1)
        if name not in MESH_AXES:
            raise ValueError(f"--mesh: unknown axis {name!r}; use {MESH_AXES}")
        out[name] = int(size)
    return out


def logical_to_spec(names: Sequence[str | None] | None, rules=DEFAULT_RULES,
                    shape: Sequence[int] | None = None, mesh: Mesh | None = None) -> P:
    """Map logical axis names to a PartitionSpec.

    A mesh axis is used at most once per array; when ``shape`` and ``mesh`` are given, an axis whose
    size does not divide the dimension is dropped (that dimension stays replicated).
    """
    if names is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        keep = []
        for ax in axes:
            if ax in used:
                continue
            if mesh is not None and shape is not None:
                size = int(np.prod([mesh.shape[a] for a in keep + [ax]]))
                if shape[i] % size:
                    continue
            keep.append(ax)
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*out)


def _names_of(x) -> tuple | None:
    if isinstance(x, nnx.Variable):
        meta = x.get_metadata()
        return meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
    return None


def state_shardings(state, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for every leaf of an NNX state (values or ShapeDtypeStructs)."""

    def one(x):
        names = _names_of(x)
        value = x.get_value() if isinstance(x, nnx.Variable) else x
        shape = getattr(value, "shape", ())
        spec = logical_to_spec(names, rules, shape, mesh) if names else P()
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
    """Shard the leading (example) axis over the batch mesh axes, replicate the rest."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def replicated_fraction(state, shardings) -> float:
    """Fraction of parameter bytes that are fully replicated under ``shardings``."""
    total = 0
    rep = 0
    for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
        n = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        total += n
        if all(a is None for a in s.spec):
            rep += n
    return rep / max(total, 1)


# ----------------------------------------------------------------------------- per-block gathering
_BLOCK_GATHER: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("block_gather", default=None)


@contextlib.contextmanager
def gather_per_block(gather: Callable[[nnx.Module], nnx.Module]) -> Iterator[None]:
    """While tracing a model under this context, each transformer block runs through
    :func:`gathered_block_call` with ``gather(block) -> block`` (its parameters all-gathered over the
    ``fsdp`` axis), so only one block's gathered parameters are live at a time (FSDP / ZeRO-3 per
    layer), in the forward and in the backward pass."""
    token = _BLOCK_GATHER.set(gather)
    try:
        yield
    finally:
        _BLOCK_GATHER.reset(token)


def block_gather() -> Callable[[nnx.Module], nnx.Module] | None:
    """The per-block gather function of the enclosing :func:`gather_per_block`, or ``None``."""
    return _BLOCK_GATHER.get()


def without_axes(sharding: NamedSharding, axes: tuple[str, ...]) -> NamedSharding:
    """The same sharding with the mesh ``axes`` removed from every dimension (gathered over them)."""
    spec = []
    for entry in sharding.spec:
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept = tuple(n for n in names if n not in axes)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return NamedSharding(sharding.mesh, P(*spec))


def module_gatherer(mesh: Mesh, rules=DEFAULT_RULES, axes: tuple[str, ...] = ("fsdp",)
                    ) -> Callable[[nnx.Module], nnx.Module]:
    """``gather(module)``: the module with every parameter constrained to its rule sharding without
    the mesh ``axes`` (gathered over them)."""

    def gather(module: nnx.Module) -> nnx.Module:
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)

        def one(var, sharding):
            # Pinned to the stored layout first, so whatever produced the value (the data dependency
            # of gathered_block_call) runs on the shard, not after the gather.
            value = jax.lax.with_sharding_constraint(var.get_value(), sharding)
            return var.replace(jax.lax.with_sharding_constraint(value, without_axes(sharding, axes)))

        is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
        params = jax.tree.map(one, params, state_shardings(params, mesh, rules), is_leaf=is_var)
        return nnx.merge(graphdef, params, rest)

    return gather


def after(tree, *deps):
    """``tree`` made data-dependent on ``deps``: each floating leaf plus zero times one element of
    the first floating leaf of ``deps``, so no computation on ``tree`` can be scheduled before
    ``deps`` exist. (``jax.lax.optimization_barrier`` states the same intent, but the XLA CPU
    compiler expands barriers before scheduling; a float ``0 * x`` is not folded, as it is NaN for
    an infinite ``x``.) Values are unchanged while that element is finite."""
    dep = next((x for x in jax.tree.leaves(deps) if jnp.issubdtype(x.dtype, jnp.inexact)), None)
    if dep is None:
        return tree
    zero = jnp.float32(0.0) * jax.lax.index_in_dim(dep.reshape(-1), 0, keepdims=False).astype(jnp.float32)

    def one(x):
        return x + zero.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact) else x

    return jax.tree.map(one, tree)


def gathered_block_call(call: Callable, gather: Callable[[nnx.Module], nnx.Module]) -> Callable:
    """``call(block, *args)`` run on ``gather(block)``, holding one gathered block at a time.

    Forward: the block's sharded parameters are gathered once its inputs exist, the block runs, and
    only the sharded parameters and the inputs are kept for the backward pass. Backward: once the
    cotangent of the block's outputs exists, the parameters are gathered again, the block's forward
    is recomputed and differentiated; the parameter gradients leave in the stored (sharded) layout
    through the transpose of the gather (a reduce-scatter).

    The ordering is the point. A gather depends only on the sharded parameters, so the compiler is
    free to hoist it, and does: with the gathers left free, XLA (jax 0.10.2, CPU) issued every
    block's backward re-gather during the forward pass, the whole model resident again. Each gather
    is therefore made data-dependent (:func:`after`) on the block's inputs (forward) and on the
    cotangent of its outputs (backward). A ``jax.checkpoint`` of the block cannot express the
    backward dependency, and its policies keep the gathered copies unless they refuse them
    (``jax.checkpoint_policies.save_anything_except_these_names`` in jax 0.10.2 refuses nothing: it
    saves every value, names included).
    """

    def run(block: nnx.Module, *args):
        graphdef, params, rest = nnx.split(block, nnx.Param, ...)

        def apply(p, a, dep):
            return call(gather(nnx.merge(graphdef, after(p, dep), rest)), *a)

        @jax.custom_vjp
        def f(p, a):
            return apply(p, a, a)

        def fwd(p, a):
            return apply(p, a, a), (p, a)

        def bwd(res, ct):
            p, a = res
            _, vjp = jax.vjp(lambda p, a: apply(p, a, ct), p, a)
            return vjp(ct)

        f.defvjp(fwd, bwd)
        return f(params, args)

    return run
