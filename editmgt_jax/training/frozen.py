"""Models the trainer loads rather than trains: the editor's frozen VQ tokenizer, the release's
frozen CLIP + Gemma-2 text side, the empty prompt's text states, and parameters to fine-tune from
(``init_from``); plus copying the release text side into an exported model."""

from __future__ import annotations

import os

import numpy as np
from absl import logging

from editmgt_jax.training.tokenizers import ReleaseInstructionTokenizer, release_text_checkpoint


def load_frozen_vq(config, mesh, rules, compiler_options=None):
    """The editor's frozen tokenizer: (ModelProgram, (params, rest), VQConfig dict)."""
    import jax
    from editmgt_jax import checkpoints
    from editmgt_jax.models.vq import VQConfig
    from editmgt_jax.training.state import DTYPES, ModelProgram, vq_model

    path = config.editor.vq_checkpoint
    if path:
        doc = checkpoints.read_config(os.path.expanduser(path))
        if "vq" not in doc.get("components", {}):
            raise checkpoints.CheckpointError(f"{path}: no 'vq' component")
        vcfg = VQConfig.from_dict(doc["components"]["vq"])
    else:
        vcfg = VQConfig.from_dict(dict(config.vq.model))
    dtype = DTYPES[config.precision.compute_dtype]
    prog = ModelProgram.create(lambda rngs: vq_model(vcfg, rngs, dtype), mesh, rules)
    if path:
        params = checkpoints.load_component(os.path.expanduser(path), "vq", prog.abstract_params,
                                            prog.param_shardings)
        rest = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), prog.abstract_rest)
        logging.info("frozen VQ tokenizer from %s", path)
    else:
        logging.warning("editor.vq_checkpoint is empty: the frozen VQ tokenizer is RANDOMLY "
                        "initialised (fine for smoke tests; train one with configs/vq_tiny.py)")
        params, rest = prog.init(int(config.seed) + 1000, compiler_options)
    return prog, (params, rest), vcfg.to_dict()


def load_uncond_text(config) -> dict:
    """The frozen encoders' encoding of the empty prompt, for condition dropout with precomputed
    text states: ``editor.uncond_text`` = an .npz with ``text_states`` [1, L, D], ``pooled`` [1, P]."""
    if float(config.editor.cond_dropout) <= 0:
        return {}
    path = config.editor.uncond_text
    if not path:
        raise ValueError("editor.text.kind='precomputed' with cond_dropout > 0 needs "
                         "editor.uncond_text: an .npz with the empty prompt's text_states [1, L, D] "
                         "and pooled [1, P] from the same frozen encoders")
    with np.load(os.path.expanduser(path)) as z:
        return {"uncond": (np.asarray(z["text_states"], np.float32), np.asarray(z["pooled"], np.float32))}


def load_frozen_text(config, mesh, rules, compiler_options=None):
    """The ``editor.text.kind = "release"`` text side, frozen: ``(ModelProgram of a
    ReleaseTextEncoder, (params, rest), uncond, checkpoint)``.

    The encoders' parameters (``clip`` and ``gemma`` components of the checkpoint) are restored
    directly sharded by the logical-axis ``rules`` on ``mesh``; they go in ``aux["frozen"]["text"]``,
    never in the train state. ``uncond`` = ``(text_states [1, L, D], pooled [1, P])`` float32: the
    same encoders' output for the empty prompt (condition dropout, and the sample grids' negative
    prompt), computed once here with the same module the step runs.
    """
    import jax
    from editmgt_jax import checkpoints
    from editmgt_jax.models.text.clip import CLIPTextConfig
    from editmgt_jax.models.text.gemma2 import Gemma2Config
    from editmgt_jax.parallel import replicated
    from editmgt_jax.training.state import DTYPES, ModelProgram, release_text_builder, transformer_config

    path, field = release_text_checkpoint(config)
    comps = checkpoints.read_config(path)["components"]
    try:
        clip_cfg = CLIPTextConfig.from_dict(comps["clip"])
        gemma_cfg = Gemma2Config.from_dict(comps["gemma"])
    except (TypeError, ValueError, KeyError) as e:
        raise checkpoints.CheckpointError(f"{field}: clip/gemma config is not valid: {e}") from e
    tcfg = transformer_config(config)
    if (gemma_cfg.hidden_size, clip_cfg.projection_dim) != (tcfg.joint_attention_dim,
                                                            tcfg.pooled_projection_dim):
        raise ValueError(
            f"{field}: the text encoders give states of width {gemma_cfg.hidden_size} (gemma) and "
            f"pooled vectors of {clip_cfg.projection_dim} (clip), but editor.transformer expects "
            f"joint_attention_dim={tcfg.joint_attention_dim}, "
            f"pooled_projection_dim={tcfg.pooled_projection_dim}")
    dtype = DTYPES[config.editor.text.get("compute_dtype", "float32")]
    prog = ModelProgram.create(release_text_builder(clip_cfg, gemma_cfg, dtype), mesh, rules)
    params = {name: checkpoints.load_component(path, name, prog.abstract_params[name],
                                               prog.param_shardings[name])
              for name in ("clip", "gemma")}
    rest = jax.device_put(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), prog.abstract_rest),
                          prog.rest_shardings)
    logging.info("frozen CLIP + Gemma-2 text encoders from %s", path)

    ids = ReleaseInstructionTokenizer(path).prompt([""], allow_empty=True)
    rep = replicated(mesh)
    encode = jax.jit(lambda p, r, c, g: prog.merge(p, r)(c, g),
                     in_shardings=(prog.param_shardings, prog.rest_shardings, rep, rep),
                     out_shardings=(rep, rep), compiler_options=compiler_options)
    states, pooled = encode(params, rest, ids["clip_ids"], ids["gemma_ids"])
    uncond = (np.asarray(jax.device_get(states), np.float32),
              np.asarray(jax.device_get(pooled), np.float32))
    return prog, (params, rest), uncond, path


def add_release_text(model_dir: str, source: str) -> None:
    """Copy the ``clip`` and ``gemma`` components and the tokenizer folders of ``source`` into an
    exported model checkpoint, so ``Editor.load(model_dir)`` has the text side the editor was
    fine-tuned with (the encoders are frozen: the files are exactly what training used)."""
    from editmgt_jax import checkpoints

    checkpoints.add_components(model_dir, source, ("clip", "gemma"), tokenizers=True)


def load_init_params(config, program):
    """Parameters to fine-tune from ``config.init_from`` (a model checkpoint folder)."""
    from editmgt_jax import checkpoints

    path = os.path.expanduser(config.init_from)
    abstract, shard = program.model.abstract_params, program.model.param_shardings
    if getattr(program, "lora", None) is not None:   # LoRA: these are the frozen model's
        abstract, shard = program.model.abstract_rest, program.model.rest_shardings
    if config.task == "vq":
        return checkpoints.load_component(path, "vq", abstract, shard)
    out = dict(abstract)
    out["transformer"] = checkpoints.load_params(path, "transformer", abstract["transformer"],
                                                 shard["transformer"])
    if abstract.get("text_encoder"):
        comps = checkpoints.read_config(path).get("components", {})
        if "small_text" not in comps:
            raise checkpoints.CheckpointError(f"{path}: no 'small_text' component to initialise the "
                                              "text encoder from (use editor.text.kind='release' or "
                                              "'precomputed')")
        out["text_encoder"] = checkpoints.load_component(path, "small_text", abstract["text_encoder"],
                                                         shard["text_encoder"])
    return out
