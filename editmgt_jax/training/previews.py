"""Preview grids during training: the current parameters' outputs on a fixed evaluation batch."""

from __future__ import annotations

import numpy as np

from editmgt_jax.training.batches import prepare_batch
from editmgt_jax.training.losses import sampler_timestep_convention


def image_grid(columns: list[np.ndarray]) -> np.ndarray:
    """Columns of ``[N, H, W, 3]`` images in [0, 1] (or uint8) -> one ``[N*H, C*W, 3] uint8`` grid."""
    cols = []
    for c in columns:
        c = np.asarray(c)
        if c.dtype != np.uint8:
            c = np.round(np.clip(np.nan_to_num(c.astype(np.float32)), 0, 1) * 255).astype(np.uint8)
        cols.append(np.concatenate(list(c), axis=0))
    return np.concatenate(cols, axis=1)


class Sampler:
    """Periodic sample grids of the current parameters on a fixed evaluation batch.

    vq: input | reconstruction. editor: source | target | greedy sample edit (the instruction's
    edit decoded with the frozen tokenizer; pre-tokenised data shows the decoded tokens).
    """

    def __init__(self, config, program, aux, frozen_programs, eval_raw, mesh):
        import jax

        self.config = config
        self.program = program
        self.aux = aux
        self.frozen_programs = frozen_programs
        self.raw = {k: v[: int(config.train.num_samples)] for k, v in eval_raw.items()}
        self.mesh = mesh
        self.available = config.task == "vq" or ("vq" in aux["frozen"] and (
            config.editor.text.kind == "small" or "uncond" in aux["frozen"]))
        self._fn = None
        self._jax = jax

    def _build(self):
        import jax
        import jax.numpy as jnp

        from editmgt_jax.sampling.config import SamplerSettings
        from editmgt_jax.sampling.region_hold import sample
        from editmgt_jax.training.step import mask_token_id, to_unit_range

        cfg = self.config
        model_prog = self.program.model
        if cfg.task == "vq":
            def fn(params, aux, images):
                model = model_prog.merge(params, aux["rest"])
                return model(to_unit_range(images))[0]
            return jax.jit(fn)

        vq_prog = self.frozen_programs["vq"]
        text_prog = self.frozen_programs.get("text")
        guidance = 3.0 if float(cfg.editor.cond_dropout) > 0 else 1.0
        scfg, knobs = SamplerSettings(
            steps=int(cfg.train.sample_steps), guidance_scale=guidance, reference_strength=1.0, greedy=True,
            mask_token_id=mask_token_id(cfg),
            timestep_convention=sampler_timestep_convention(cfg.editor.timestep_convention)).split()
        mask_id = model_prog.abstract_params["transformer"]["mlm_layer"]["conv2"]["kernel"].shape[-1]

        def fn(params, aux, batch):
            model = model_prog.merge(params, aux["rest"])
            vq = vq_prog.merge(*aux["frozen"]["vq"])
            src = batch["source_ids"] if "source_ids" in batch else vq.encode_ids(
                to_unit_range(batch["source"]))
            if model.text_encoder is not None:
                states, pooled = model.text_encoder(batch["instruction_ids"])
                empty = jnp.zeros((1, batch["instruction_ids"].shape[1]), jnp.int32)
                nstates, npooled = model.text_encoder(empty)
            elif text_prog is not None:    # the release's frozen encoders
                text = text_prog.merge(*aux["frozen"]["text"])
                states, pooled = text(batch["clip_ids"], batch["gemma_ids"])
                nstates, npooled = aux["frozen"]["uncond"]
            else:
                states, pooled = batch["text_states"], batch["pooled"]
                nstates, npooled = aux["frozen"]["uncond"]

            micro = batch.get("micro_conds")
            out = sample(model.transformer, scfg, knobs, src, states, pooled, nstates, npooled, micro_conds=micro)
            tokens = jnp.where(out["tokens"] >= mask_id, 0, out["tokens"])
            if "source" in batch:
                shown = (to_unit_range(batch["source"]), to_unit_range(batch["target"]))
            else:   # pre-tokenised data: show what the tokens decode to
                shown = (vq.decode_ids(batch["source_ids"]), vq.decode_ids(batch["target_ids"]))
            return shown + (vq.decode_ids(tokens),)
        return jax.jit(fn)

    def grid(self, params) -> np.ndarray | None:
        if not self.available:
            return None
        if self._fn is None:
            self._fn = self._build()
        batch = prepare_batch(self.raw, self.config)
        batch = {k: v for k, v in batch.items() if k != "index"}
        if self.config.task == "vq":
            images = batch["image"][: len(self.raw["target"])]
            recon = self._jax.device_get(self._fn(params, self.aux, images))
            return image_grid([images, recon])
        return image_grid(list(self._jax.device_get(self._fn(params, self.aux, batch))))
