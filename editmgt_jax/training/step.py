"""Jitted train and eval steps for the two tasks, with explicit shardings and donation.

One ``jax.jit`` per program, the single functional boundary: the NNX model is rebuilt from its
``GraphDef`` and a pure-dict of parameters inside the traced function, so the jitted function
sees only arrays. Signatures::

    train_step(state: TrainState, batch: dict, aux: dict) -> (TrainState, metrics: dict)
    eval_step(params, batch: dict, aux: dict, key_data: [2] uint32) -> metrics: dict
    grad_step(params, batch: dict, aux: dict, key_data: [2] uint32) -> ((loss, metrics), grads)

``aux`` holds what the step needs but does not train: the trained model's non-parameter variables
(``rest``) and the frozen modules' arrays (``frozen``: e.g. the VQ tokenizer that turns pixels into
tokens inside the step, the release's CLIP + Gemma-2 text encoders, or the unconditional text
states of frozen encoders). Frozen modules get no gradients and no optimizer state. ``state`` is
donated.

Batches (dicts of host arrays; the leading axis is the example axis, sharded over data x fsdp):

* editor: ``source``/``target`` images [B, R, R, 3] (uint8 in [0, 255] or float in [0, 1]) — or
  pre-tokenised ``source_ids``/``target_ids`` [B, h, w] int32; ``instruction_ids`` [B, L] int32
  (``editor.text.kind == "small"``), ``text_states`` [B, L, D] + ``pooled`` [B, P] (``"precomputed"``:
  frozen encoders run beforehand) or ``clip_ids`` [B, 77] + ``gemma_ids`` [B, 256] int32
  (``"release"``: the frozen encoders in ``aux["frozen"]["text"]`` run in the step); optional
  ``micro_conds`` [B, 5] and ``index`` [B] (example ids).
* vq: ``image`` [B, R, R, 3] (or ``target``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from editmgt_jax.models.embeddings import DEFAULT_AESTHETIC
from editmgt_jax.parallel import (DEFAULT_RULES, batch_sharding, gather_per_block, module_gatherer, replicated,
                                  without_axes)
from editmgt_jax.training import losses
from editmgt_jax.training.state import ModelProgram, TrainProgram, TrainState

LossFn = Callable[..., tuple[jax.Array, dict]]


def to_unit_range(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] or float [0, 1] images -> f32 in [0, 1]."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Task losses: (model, frozen modules, batch, key) -> (loss, metrics)


@dataclasses.dataclass(frozen=True)
class EditorLoss:
    """Masked-token cross-entropy on target tokens given source tokens and the instruction."""

    mask_id: int
    text_kind: str = "small"              # "small" | "precomputed" | "release"
    cond_dropout: float = 0.1
    timestep_convention: str = "mask_fraction"
    aesthetic: float = DEFAULT_AESTHETIC
    image_size: int | None = None         # default micro-conditions when the batch has none
    changed_weight: float = 1.0           # loss weight of positions the edit changes (target != source)
    full_mask_prob: float = 0.0           # fraction of examples with the whole target masked
    changed_share: float = 0.0            # > 0: per-example loss, this share on the changed positions
                                          #   (losses.balanced_changed_cross_entropy; replaces changed_weight)
    region_weight: float = 0.0            # > 0: + this times losses.region_attention_loss on the
    region_blocks: tuple[int, ...] = ()   #   captured attention of these blocks (the sampler's)

    def tokens(self, batch, frozen):
        if "target_ids" in batch:
            if "source_ids" not in batch:
                raise KeyError("editor batch has target_ids but no source_ids")
            return batch["source_ids"].astype(jnp.int32), batch["target_ids"].astype(jnp.int32)
        if "vq" not in frozen:
            raise KeyError("editor batch carries images but no VQ tokenizer was loaded "
                           "(set editor.vq_checkpoint, or pre-tokenise the data)")
        vq = frozen["vq"]
        # The tokenizer is frozen: ids are integers, so no gradient reaches it anyway.
        src = vq.encode_ids(to_unit_range(batch["source"]))
        tgt = vq.encode_ids(to_unit_range(batch["target"]))
        return jax.lax.stop_gradient(src), jax.lax.stop_gradient(tgt)

    def text(self, model, batch, frozen):
        """-> (cond (states, pooled), uncond (states [1, L, D], pooled [1, P]) or None)."""
        if self.text_kind == "small":
            ids = batch["instruction_ids"].astype(jnp.int32)
            cond = model.text_encoder(ids)
            uncond = None
            if self.cond_dropout > 0:
                empty = jnp.full((1, ids.shape[1]), model.text_encoder.config.pad_id, jnp.int32)
                uncond = model.text_encoder(empty)
            return cond, uncond
        if self.text_kind == "precomputed":
            cond = (batch["text_states"], batch["pooled"])
            uncond = frozen.get("uncond")
            if self.cond_dropout > 0 and uncond is None:
                raise KeyError("condition dropout with precomputed text states needs the "
                               "unconditional states (aux frozen['uncond'])")
            return cond, uncond
        if self.text_kind == "release":
            if "text" not in frozen:
                raise KeyError("editor.text.kind='release' needs the frozen text encoders "
                               "(aux frozen['text'], a ReleaseTextEncoder program)")
            # Frozen: aux is never differentiated (only state.params are); stop_gradient says so.
            cond = jax.lax.stop_gradient(frozen["text"](batch["clip_ids"], batch["gemma_ids"]))
            uncond = frozen.get("uncond")
            if self.cond_dropout > 0 and uncond is None:
                raise KeyError("condition dropout with the release text encoders needs the empty "
                               "prompt's encoding (aux frozen['uncond'])")
            return cond, uncond
        raise ValueError(f"editor text kind {self.text_kind!r}")

    def __call__(self, model, frozen: Mapping, batch: Mapping, key: jax.Array):
        src, tgt = self.tokens(batch, frozen)
        b = tgt.shape[0]
        ids = batch["index"] if "index" in batch else jnp.arange(b)
        keys = losses.example_keys(key, ids)
        mask_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
        drop_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
        masked, mask, ratio, fraction = losses.mask_target_tokens(mask_keys, tgt, self.mask_id,
                                                                        self.full_mask_prob)
        (states, pooled), uncond = self.text(model, batch, frozen)
        metrics = {}
        if self.cond_dropout > 0:
            states, pooled, dropped = losses.condition_dropout(drop_keys, self.cond_dropout,
                                                               (states, pooled), uncond)
            metrics["cond_dropped"] = jnp.mean(dropped.astype(jnp.float32))
        if "micro_conds" in batch:
            micro = batch["micro_conds"].astype(jnp.float32)
        else:
            size = self.image_size or (batch["target"].shape[1] if "target" in batch else None)
            if size is None:
                raise KeyError("editor batch has no micro_conds and no image size is configured")
            micro = losses.default_micro_conds(b, size, size, self.aesthetic)
        timestep = losses.training_timestep(ratio, fraction, self.timestep_convention)
        region = self.region_weight > 0 and bool(self.region_blocks)
        capture = dict(capture_blocks=self.region_blocks, capture_grad=True) if region else {}
        logits, scores = model.transformer(masked, src, states, pooled, micro, timestep, **capture)
        weights = (losses.changed_token_weights(src, tgt, self.changed_weight)
                   if self.changed_weight != 1.0 else None)
        loss, acc = losses.masked_token_cross_entropy(logits, tgt, mask, weights)
        if self.changed_share > 0:
            loss = losses.balanced_changed_cross_entropy(logits, src, tgt, mask, self.changed_share)
        if region:
            kept_text = None if "cond_dropped" not in metrics else 1.0 - dropped.astype(jnp.float32)
            region_loss, region_mass = losses.region_attention_loss(scores, src, tgt, kept_text)
            metrics.update(token_loss=loss, region_loss=region_loss, region_mass=region_mass)
            loss = loss + self.region_weight * region_loss
        hits, count = losses.changed_token_hits(logits, src, tgt, mask)
        metrics.update(loss=loss, masked_accuracy=acc, mask_fraction=jnp.mean(fraction),
                       changed_accuracy=hits / jnp.maximum(count, 1.0),
                       changed_fraction=jnp.mean((src != tgt).astype(jnp.float32)))
        return loss, metrics


@dataclasses.dataclass(frozen=True)
class VQLoss:
    """Reconstruction + codebook + commitment terms of the tokenizer."""

    l1_weight: float = 1.0
    l2_weight: float = 0.0
    codebook_weight: float = 1.0
    commitment_weight: float = 0.25
    codebook_size: int = 0

    def __call__(self, model, frozen: Mapping, batch: Mapping, key: jax.Array):
        del frozen, key
        pixels = to_unit_range(batch["image"] if "image" in batch else batch["target"])
        recon, aux, ids = model(pixels)
        loss, terms = losses.vq_loss(pixels, recon, aux, l1_weight=self.l1_weight,
                                     l2_weight=self.l2_weight, codebook_weight=self.codebook_weight,
                                     commitment_weight=self.commitment_weight)
        metrics = dict(loss=loss, **terms)
        if self.codebook_size:
            used = jnp.zeros((self.codebook_size,), jnp.int32).at[ids.reshape(-1)].max(1)
            metrics["codebook_usage"] = jnp.mean(used.astype(jnp.float32))
        return loss, metrics


def mask_token_id(config, tcfg=None) -> int:
    """The mask id an editor config trains (and previews) with.

    Fine-tuning a model checkpoint (``init_from``): the mask id its conventions record names (a
    converted release: the one its scheduler config names). Otherwise the last vocabulary row,
    ``editor.transformer.vocab_size - 1``, as the official training does.
    """
    import os

    from editmgt_jax import checkpoints
    from editmgt_jax.training.state import transformer_config

    tcfg = tcfg or transformer_config(config)
    init = os.path.expanduser(config.get("init_from", "") or "")
    if init and checkpoints.has_config(init):
        conv = checkpoints.read_conventions(init)
        where = f"init_from={init!r}"
    else:
        conv = checkpoints.Conventions(mask_token_id=checkpoints.default_mask_token_id(tcfg.to_dict()))
        where = "editor.transformer"
    return conv.check_vocabulary(tcfg.vocab_size, tcfg.codebook_size, where).mask_token_id


def region_loss_blocks(config) -> tuple[int, ...]:
    """The blocks whose attention the region loss trains: ``editor.region_loss_blocks``, else the
    blocks the exported sampler settings consolidate (``editor.sampler_defaults``), so the map the
    loss shapes is the map region hold reads."""
    e = config.editor
    blocks = tuple(e.region_loss_blocks)
    if not blocks:
        blocks = tuple(e.sampler_defaults.get("consolidation_blocks", ()))
    return tuple(int(b) for b in blocks)


def loss_from_config(config) -> EditorLoss | VQLoss:
    if config.task == "editor":
        from editmgt_jax.training.state import transformer_config

        e = config.editor
        tcfg = transformer_config(config)
        return EditorLoss(mask_id=mask_token_id(config, tcfg), text_kind=e.text.kind,
                          cond_dropout=float(e.cond_dropout),
                          timestep_convention=e.timestep_convention,
                          aesthetic=float(e.aesthetic), image_size=int(e.image_size) or None,
                          changed_weight=float(e.changed_weight), full_mask_prob=float(e.full_mask_prob),
                          changed_share=float(e.changed_share), region_weight=float(e.region_loss_weight),
                          region_blocks=region_loss_blocks(config))
    if config.task == "vq":
        v = config.vq
        return VQLoss(l1_weight=float(v.l1_weight), l2_weight=float(v.l2_weight),
                      codebook_weight=float(v.codebook_weight),
                      commitment_weight=float(v.commitment_weight),
                      codebook_size=int(v.model.get("num_vq_embeddings", 0) or 0))
    raise ValueError(f"config.task={config.task!r}")


# ---------------------------------------------------------------------------------------------
# Shardings of batches and aux inputs


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh, rules=DEFAULT_RULES) -> dict:
    """Leading axis over the batch mesh axes (data x fsdp) for every field."""
    return {k: batch_sharding(mesh, np.ndim(v), rules) for k, v in batch.items()}


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, rules=DEFAULT_RULES) -> dict:
    """Assemble this process's slice of the batch into global ``jax.Array``s.

    Each process passes its own examples (``B_local`` each); the result has
    ``B_local * process_count`` examples, sharded over data x fsdp.
    """
    shard = batch_shardings(local, mesh, rules)
    n = jax.process_count()
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        spec_axes = shard[k].spec[0] if len(shard[k].spec) else None
        axes = (spec_axes,) if isinstance(spec_axes, str) else tuple(spec_axes or ())
        ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if (v.shape[0] * n) % ways:
            raise ValueError(f"batch field {k!r}: global batch {v.shape[0] * n} does not divide "
                             f"over the {ways}-way batch sharding of mesh {dict(mesh.shape)}")
        out[k] = jax.make_array_from_process_local_data(shard[k], v, (v.shape[0] * n,) + v.shape[1:])
    return out


# ---------------------------------------------------------------------------------------------
# Steps


GATHER_MODES = (True, False, "block", "step")
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


@dataclasses.dataclass
class Steps:
    """The jitted programs of one training run and the shardings of their inputs."""

    train: Callable        # (state, batch, aux) -> (state, metrics); state donated
    eval: Callable         # (params, batch, aux, key_data) -> metrics
    aux_shardings: Any
    batch_shardings: dict
    # (params, batch, aux, key_data) -> ((loss, metrics), grads): the gradient the train step
    # would apply (grads sharded like params); compiled only when called.
    grads: Callable | None = None


def aux_shardings(program: TrainProgram, frozen_programs: Mapping[str, ModelProgram], aux) -> dict:
    """Shardings of ``aux``: frozen modules sharded by their own rules, other arrays replicated."""
    rep = replicated(program.mesh)
    frozen = {}
    for name, value in aux["frozen"].items():
        if name in frozen_programs:
            p = frozen_programs[name]
            frozen[name] = (p.param_shardings, p.rest_shardings)
        else:
            frozen[name] = jax.tree.map(lambda _: rep, value)
    return {"rest": program.model.rest_shardings, "frozen": frozen}


def make_steps(program: TrainProgram, loss_fn: LossFn, frozen_programs: Mapping[str, ModelProgram],
               example_batch: Mapping[str, Any], example_aux: Mapping[str, Any], *,
               rules=DEFAULT_RULES, donate: bool = True, gather_fsdp: bool | str = True, compiler_options: Mapping[str, Any] | None = None) -> Steps:
    """Build the jitted train and eval steps.

    ``frozen_programs``: name -> ``ModelProgram`` of modules run inside the step without training
    (their arrays arrive in ``aux["frozen"][name] = (params, rest)``); other ``aux["frozen"]``
    entries are passed through as arrays. ``example_batch`` / ``example_aux``: any instances (arrays
    or shape structs, global shapes) fixing the input structure. Rematerialisation is the model's
    business (``EditTransformer(remat=True)`` recomputes each block in the backward pass).

    ``gather_fsdp``: all-gather the parameters over the ``fsdp`` mesh axis for compute (ZeRO-3 /
    FSDP: weights gathered for compute, gradients reduce-scattered back to the stored sharding).
    ``True`` or ``"block"``: each transformer block gathers its own parameters right before it runs
    and again in the backward pass, where it recomputes its forward (block remat implied;
    :func:`editmgt_jax.parallel.gathered_block_call`), so a device holds its 1/N shard of the model
    plus one gathered block (the other parameters are gathered at the start); ``"step"``: every parameter is gathered
    at the start of the forward (the whole model resident); ``False``: left to the partitioner. Stated explicitly because, left to choose, the XLA SPMD partitioner (jax
    0.10.2) can produce wrong gradients for a chain of matmuls whose weights are sharded over both
    ``fsdp`` and ``tensor`` followed by a norm (openxla/xla#40034 describes the same class of bug);
    the mesh-equivalence test catches it. ``compiler_options``: XLA options for the programs
    (e.g. ``{"xla_backend_optimization_level": 0}`` to compile faster in tests).

    Besides ``train`` and ``eval``, ``Steps.grads`` is the loss and gradient of one batch without
    the update (for checks and debugging; compiled on first use).
    """
    mesh = program.mesh
    model_prog = program.model
    tx = program.tx
    accum = program.grad_accum_steps
    schedule = program.schedule
    rep = replicated(mesh)
    b_shard = batch_shardings(example_batch, mesh, rules)
    a_shard = aux_shardings(program, frozen_programs, example_aux)

    def modules(params, aux):
        model = model_prog.merge(params, aux["rest"])
        frozen = {name: frozen_programs[name].merge(*value) if name in frozen_programs else value
                  for name, value in aux["frozen"].items()}
        return model, frozen

    if gather_fsdp not in GATHER_MODES:
        raise ValueError(f"gather_fsdp must be one of {GATHER_MODES}, got {gather_fsdp!r}")
    mode = gather_fsdp if mesh.shape.get("fsdp", 1) > 1 else False
    mode = "block" if mode is True else mode
    gathered = None
    if mode:
        def target(path, s):
            # per block: the transformer blocks stay sharded here and gather inside the model
            in_block = any(getattr(k, "key", None) in BLOCK_LISTS for k in path)
            return s if mode == "block" and in_block else without_axes(s, ("fsdp",))
        gathered = jax.tree_util.tree_map_with_path(target, model_prog.param_shardings)
    gather_block = module_gatherer(mesh, rules) if mode == "block" else None

    def compute_loss(params, aux, batch, key):
        if gathered is not None:
            params = jax.lax.with_sharding_constraint(params, gathered)
        model, frozen = modules(params, aux)
        if gather_block is None:
            return loss_fn(model, frozen, batch, key)
        with gather_per_block(gather_block):
            return loss_fn(model, frozen, batch, key)

    def train_step(state: TrainState, batch, aux):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (loss, metrics), grads = jax.value_and_grad(compute_loss, has_aux=True)(
            state.params, aux, batch, key)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A non-finite step leaves the state untouched; the host stops on the flag.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                               opt_state=keep(opt_state, state.opt_state), rng=state.rng)
        metrics = dict(metrics, grad_norm=grad_norm, finite=finite,
                       learning_rate=schedule(state.step // accum))
        return new_state, metrics

    def eval_step(params, batch, aux, key_data):
        _, metrics = compute_loss(params, aux, batch, jax.random.wrap_key_data(key_data))
        return metrics

    train = jax.jit(train_step, in_shardings=(program.state_shardings, b_shard, a_shard),
                    out_shardings=(program.state_shardings, rep),
                    donate_argnums=(0,) if donate else (), compiler_options=compiler_options)
    evaluate = jax.jit(eval_step, in_shardings=(model_prog.param_shardings, b_shard, a_shard, rep),
                       out_shardings=rep, compiler_options=compiler_options)

    def grad_step(params, batch, aux, key_data):
        return jax.value_and_grad(compute_loss, has_aux=True)(
            params, aux, batch, jax.random.wrap_key_data(key_data))

    grads = jax.jit(grad_step, in_shardings=(model_prog.param_shardings, b_shard, a_shard, rep),
                    out_shardings=((rep, rep), model_prog.param_shardings),
                    compiler_options=compiler_options)
    return Steps(train=train, eval=evaluate, aux_shardings=a_shard, batch_shardings=b_shard,
                 grads=grads)
