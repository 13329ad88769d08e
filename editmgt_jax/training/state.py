"""The functional train state and everything that builds it from a config.

A training program is split once, at construction, into

* a static part: the NNX ``GraphDef`` of the trainable model, its non-trainable variables
  (``rest``, replicated), the optax transformation and the shardings of every array;
* a ``TrainState`` pytree of arrays (params, optimizer state, step, RNG) that the jitted step
  consumes and returns, donated so the update happens in place.

Parameters are fp32 master weights; ``precision.compute_dtype = "bfloat16"`` builds the model with
bf16 activations/matmuls over those weights (the mixed-precision policy), and losses are computed in
fp32. Parameters are created directly sharded (``jax.jit`` with ``out_shardings``), so a model that
does not fit on one device never has to.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from editmgt_jax.parallel import DEFAULT_RULES, replicated, replicated_fraction, state_shardings

TASKS = ("editor", "vq")
# editor.text.kind: "small" = a small encoder trained with the editor; "precomputed" = text states
# and pooled vectors in the batch; "release" = the frozen CLIP + Gemma-2 encoders of a model
# checkpoint, run inside the step on host-tokenised instructions (not trained, not in the state).
TEXT_KINDS = ("small", "precomputed", "release")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree of arrays.

    step:      [] int32, number of optimizer calls so far (micro-steps under gradient accumulation).
    params:    nested dict of fp32 arrays (the model's ``nnx.Param`` values, ``to_pure_dict`` layout).
    opt_state: the optax state for ``params``.
    rng:       [2] uint32 raw key data; step ``k`` draws from ``fold_in(rng, k)``, so a resumed run
               sees exactly the randomness of an uninterrupted one.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


# ---------------------------------------------------------------------------------------------
# Optimizer


def make_lr_schedule(optim) -> optax.Schedule:
    """Learning rate per optimizer update: ``constant``, ``warmup_constant`` or ``cosine``.

    ``optim``: a config with learning_rate, schedule, warmup_steps, decay_steps (cosine: updates
    from the start to the end of the decay, warmup included) and min_lr_ratio (cosine floor).
    """
    lr = float(optim.learning_rate)
    warmup = int(optim.get("warmup_steps", 0))
    kind = optim.get("schedule", "constant")
    if kind == "constant":
        if warmup:
            raise ValueError("optim.schedule='constant' ignores warmup_steps; "
                             "use 'warmup_constant' or set warmup_steps=0")
        return optax.constant_schedule(lr)
    if kind == "warmup_constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)], [warmup])
    if kind == "cosine":
        decay = int(optim.get("decay_steps", 0))
        if decay <= warmup:
            raise ValueError(f"optim.schedule='cosine' needs decay_steps ({decay}) > warmup_steps "
                             f"({warmup})")
        return optax.warmup_cosine_decay_schedule(
            0.0 if warmup else lr, lr, warmup, decay, end_value=lr * float(optim.get("min_lr_ratio", 0.0)))
    raise ValueError(f"optim.schedule={kind!r}: use 'constant', 'warmup_constant' or 'cosine'")


# Leaves never decayed, as in the release: biases, norm scales and embedding tables.
_NO_DECAY = re.compile(r"(^|/)(bias|scale|embedding)$")


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def weight_decay_mask(params) -> Any:
    """Tree of bools: True where AdamW applies weight decay.

    Decayed: matrices and conv kernels. Not decayed: biases, norm scales, embedding tables, and
    any other parameter of rank <= 1 (scales and gates under other names).
    """
    def one(path, x):
        return bool(np.ndim(x) > 1 and not _NO_DECAY.search(_path_str(path)))

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(optim) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (release defaults: lr 1e-4, betas 0.9/0.999, weight decay 0.01 masked), global-norm
    clipping and, for ``grad_accum_steps > 1``, ``optax.MultiSteps`` accumulation.

    Returns the transformation and the learning-rate schedule (indexed by optimizer updates).
    """
    schedule = make_lr_schedule(optim)
    parts = []
    if optim.get("grad_clip", 0):
        parts.append(optax.clip_by_global_norm(float(optim.grad_clip)))
    parts.append(optax.adamw(schedule, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
                             weight_decay=float(optim.weight_decay), mask=weight_decay_mask))
    tx = optax.chain(*parts)
    accum = int(optim.get("grad_accum_steps", 1))
    if accum < 1:
        raise ValueError(f"optim.grad_accum_steps must be >= 1, got {accum}")
    if accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum).gradient_transformation()
    return tx, schedule


# ---------------------------------------------------------------------------------------------
# Models


class EditorModel(nnx.Module):
    """The trainable part of the editor: the transformer and, when the text side is trained
    (``editor.text.kind == "small"``), the small text encoder. Frozen parts (the VQ tokenizer, the
    release's text encoders) live elsewhere: see ``release_text_builder``."""

    def __init__(self, transformer_cfg, text_cfg=None, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, remat: bool = False):
        from editmgt_jax.models.transformer import EditTransformer

        self.transformer = EditTransformer(transformer_cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                           remat=remat)
        if text_cfg is not None:
            from editmgt_jax.models.text.small import SmallTextEncoder

            self.text_encoder = SmallTextEncoder(text_cfg, rngs=rngs, dtype=dtype,
                                                 param_dtype=param_dtype)
        else:
            self.text_encoder = None


def transformer_config(config):
    from editmgt_jax.models.transformer import TransformerConfig

    return TransformerConfig.from_dict(dict(config.editor.transformer))


def small_text_config(config):
    """The ``SmallTextConfig`` of an editor config, widths tied to the transformer's."""
    from editmgt_jax.models.text.small import SmallTextConfig

    text = config.editor.text
    fields = {k: v for k, v in dict(text).items() if k != "kind"}
    tcfg = transformer_config(config)
    fields.setdefault("joint_attention_dim", tcfg.joint_attention_dim)
    fields.setdefault("pooled_projection_dim", tcfg.pooled_projection_dim)
    return SmallTextConfig.from_dict(fields)


def release_text_builder(clip_cfg, gemma_cfg, dtype=jnp.float32,
                         param_dtype=jnp.float32) -> Callable[[nnx.Rngs], nnx.Module]:
    """``rngs -> ReleaseTextEncoder`` (CLIP + Gemma-2), for a frozen ``ModelProgram`` of the
    ``editor.text.kind = "release"`` text side; its parameters are ``{"clip": ..., "gemma": ...}``."""
    from editmgt_jax.models.text.release import ReleaseTextEncoder

    return lambda rngs: ReleaseTextEncoder.create(clip_cfg, gemma_cfg, rngs=rngs, dtype=dtype,
                                                  param_dtype=param_dtype)


def vq_config(config):
    from editmgt_jax.models.vq import VQConfig

    return VQConfig.from_dict(dict(config.vq.model))


def vq_model(cfg, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    """A ``VQModel`` of ``cfg`` computing in ``dtype`` with ``param_dtype`` parameters."""
    from editmgt_jax.models.vq import VQModel

    return VQModel(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)


def lora_config(config):
    """The ``LoRAConfig`` of ``config.editor.lora`` when enabled (editor task), else None."""
    lora = config.editor.get("lora") if config.task == "editor" else None
    if not lora or not lora.get("enabled", False):
        return None
    from editmgt_jax.models.lora import LoRAConfig

    try:
        return LoRAConfig.from_dict(dict(lora))
    except ValueError as e:
        raise ValueError(f"editor.{e}") from None


def _with_lora(build: Callable[[nnx.Rngs], nnx.Module], lcfg) -> Callable[[nnx.Rngs], nnx.Module]:
    """``build`` with adapters on the transformer (``editmgt_jax.models.lora``)."""
    from editmgt_jax.models.lora import add_lora

    def built(rngs):
        model = build(rngs)
        add_lora(model.transformer, lcfg, rngs=rngs)
        return model

    return built


def trainable_builder(config) -> Callable[[nnx.Rngs], nnx.Module]:
    """``rngs -> module`` for the trained model of ``config.task`` (with LoRA adapters on the
    transformer when ``editor.lora.enabled``)."""
    task = config.task
    dtype = DTYPES[config.precision.compute_dtype]
    param_dtype = DTYPES[config.precision.param_dtype]
    if task == "editor":
        tcfg = transformer_config(config)
        kind = config.editor.text.kind
        if kind not in TEXT_KINDS:
            raise ValueError(f"editor.text.kind={kind!r}: use 'small' (trained with the editor), "
                             "'precomputed' (frozen-encoder states in the batch) or 'release' (the "
                             "frozen CLIP + Gemma-2 encoders of editor.text.checkpoint, run in the step)")
        text_cfg = small_text_config(config) if kind == "small" else None
        build = lambda rngs: EditorModel(tcfg, text_cfg, rngs=rngs, dtype=dtype,  # noqa: E731
                                         param_dtype=param_dtype, remat=bool(config.remat))
        lcfg = lora_config(config)
        return build if lcfg is None else _with_lora(build, lcfg)
    if task == "vq":
        if config.get("remat", False):
            raise ValueError("remat=True recomputes the editor transformer's blocks; the VQ "
                             "tokenizer has no block remat (set remat=False for task 'vq')")
        vcfg = vq_config(config)
        return lambda rngs: vq_model(vcfg, rngs, dtype, param_dtype)
    raise ValueError(f"config.task={task!r}: use one of {TASKS}")


# ---------------------------------------------------------------------------------------------
# Programs: static parts + shardings


def _to_pure(state) -> Any:
    return nnx.to_pure_dict(state) if len(jax.tree.leaves(state)) else {}


@dataclasses.dataclass
class ModelProgram:
    """The static half of a split NNX model, with abstract values and shardings of its arrays.

    graphdef:        ``nnx.GraphDef`` to ``nnx.merge`` inside jitted functions.
    abstract_params: pure dict of ``jax.ShapeDtypeStruct`` (the trained leaves: ``nnx.Param``, or
                     what the ``trainable`` filter selects, e.g. ``nnx.LoRAParam`` for adapters).
    param_shardings: same tree of ``NamedSharding`` from the logical-axis rules.
    abstract_rest / rest_shardings: the other variables (RNG counters, buffers; under a
                     ``trainable`` filter also the frozen parameters), sharded by their logical axes
                     where they have them, else replicated.
    """

    graphdef: Any
    abstract_params: Any
    param_shardings: Any
    abstract_rest: Any
    rest_shardings: Any
    build: Callable[[nnx.Rngs], nnx.Module]
    trainable: Any = nnx.Param

    @classmethod
    def create(cls, build: Callable[[nnx.Rngs], nnx.Module], mesh: Mesh, rules=DEFAULT_RULES,
               trainable=nnx.Param):
        abstract = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
        graphdef, params, rest = nnx.split(abstract, trainable, ...)
        shardings = _to_pure(state_shardings(params, mesh, rules))
        plain = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), _to_pure(params))
        rest_plain = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), _to_pure(rest))
        return cls(graphdef, plain, shardings, rest_plain, _to_pure(state_shardings(rest, mesh, rules)), build,
                   trainable)

    def init(self, seed: int, compiler_options=None) -> tuple[Any, Any]:
        """Freshly initialised (params, rest), created sharded."""
        def init_fn(key):
            model = self.build(nnx.Rngs(params=key, default=key))
            _, params, rest = nnx.split(model, self.trainable, ...)
            return _to_pure(params), _to_pure(rest)

        fn = jax.jit(init_fn, out_shardings=(self.param_shardings, self.rest_shardings),
                     compiler_options=compiler_options)
        return fn(jax.random.key(seed))

    def merge(self, params, rest) -> nnx.Module:
        return nnx.merge(self.graphdef, params, rest) if rest else nnx.merge(self.graphdef, params)

    def all_params(self, params, rest):
        """Every ``nnx.Param`` of the model (trained and frozen, adapters included) as one tree."""
        if self.trainable is nnx.Param:
            return params
        return _to_pure(nnx.split(self.merge(params, rest), nnx.Param, ...)[1])

    def replicated_fraction(self) -> float:
        return replicated_fraction(self.abstract_params, self.param_shardings)


@dataclasses.dataclass
class TrainProgram:
    """A ``ModelProgram`` plus the optimizer and the shardings of the whole ``TrainState``."""

    model: ModelProgram
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    grad_accum_steps: int
    mesh: Mesh
    state_shardings: TrainState
    abstract_state: TrainState   # ShapeDtypeStructs carrying the target shardings (for restore)
    lora: Any = None             # LoRAConfig: only the adapters train, the rest of the model is frozen

    @classmethod
    def create(cls, config, mesh: Mesh, rules=DEFAULT_RULES, *, check_replication: bool = True,
               lora_needs_init_from: bool = True):
        lcfg = lora_config(config)
        if lcfg is not None and lora_needs_init_from and not config.get("init_from"):
            raise ValueError("editor.lora.enabled: adapters fine-tune a trained model; set init_from to its "
                             "model checkpoint")
        # LoRA: the train state holds the adapters only (optimizer state, gradients and checkpoints
        # too); the frozen model rides along with the other non-trained variables (``rest``).
        model = ModelProgram.create(trainable_builder(config), mesh, rules,
                                    trainable=nnx.Param if lcfg is None else nnx.LoRAParam)
        if check_replication:
            check_replicated_fraction(model, mesh, float(config.get("max_replicated_fraction", 1.0)))
        tx, schedule = make_optimizer(config.optim)
        abstract_opt = jax.eval_shape(tx.init, model.abstract_params)
        rep = replicated(mesh)
        opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, model.param_shardings,
                                              transform_non_params=lambda _: rep)
        shardings = TrainState(step=rep, params=model.param_shardings, opt_state=opt_shardings, rng=rep)
        abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32),
                              params=model.abstract_params, opt_state=abstract_opt,
                              rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract, shardings)
        return cls(model, tx, schedule, int(config.optim.get("grad_accum_steps", 1)), mesh,
                   shardings, abstract, lcfg)

    def init_state(self, seed: int, params=None, compiler_options=None) -> tuple[TrainState, Any]:
        """A fresh ``TrainState`` (and the model's ``rest``) for ``seed``.

        ``params`` (optional, same tree as the model's params) replaces the random initialisation,
        e.g. weights converted from the official release for fine-tuning. With LoRA they are the
        frozen model's (the tree of ``model.abstract_rest``) and the adapters start fresh.
        """
        if self.lora is not None:
            fresh, rest = self.model.init(seed, compiler_options)
            if params is not None:
                rest = jax.device_put(params, self.model.rest_shardings)
        elif params is not None and not jax.tree.leaves(self.model.abstract_rest):
            fresh, rest = jax.device_put(params, self.model.param_shardings), {}
        else:
            fresh, rest = self.model.init(seed, compiler_options)
            if params is not None:
                fresh = jax.device_put(params, self.model.param_shardings)
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state,
                            compiler_options=compiler_options)(fresh)
        rng = jax.device_put(jax.random.key_data(jax.random.key(seed + 1)).astype(jnp.uint32),
                             self.state_shardings.rng)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings.step)
        return TrainState(step=step, params=fresh, opt_state=opt_state, rng=rng), rest


def check_replicated_fraction(model: ModelProgram, mesh: Mesh, tolerance: float) -> float:
    """Fail when more than ``tolerance`` of the parameter bytes would be fully replicated although
    the mesh has model-parallel axes (fsdp/tensor): a sign that logical-axis rules do not match the
    model's parameter names."""
    frac = model.replicated_fraction()
    model_parallel = mesh.shape.get("fsdp", 1) * mesh.shape.get("tensor", 1)
    if model_parallel > 1 and frac > tolerance:
        raise ValueError(
            f"{frac:.1%} of the parameter bytes are replicated on mesh {dict(mesh.shape)} "
            f"(tolerance {tolerance:.1%}): the logical-axis rules leave parameters unsharded; "
            "check the rules (config.logical_axis_rules) against the parameters' axis names")
    return frac


def param_paths(params) -> list[str]:
    return [_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def rules_from_config(config) -> tuple:
    rules = config.get("logical_axis_rules", None)
    if not rules:
        return DEFAULT_RULES
    return tuple((name, tuple(t) if isinstance(t, (list, tuple)) else t) for name, t in rules)


def mesh_shape_from_config(config) -> dict[str, int]:
    m = config.mesh
    return {k: int(v) for k, v in (m.items() if isinstance(m, Mapping) else dict(m).items())}
