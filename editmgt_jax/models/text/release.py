"""The release's text side as one module: CLIP pooled vector + Gemma-2 penultimate hidden states.

EditMGT conditions its transformer on ``(text_states, pooled)``:

- ``pooled`` [B, projection_dim]: CLIP ``text_embeds`` of the 77 CLIP ids;
- ``text_states`` [B, 256, hidden]: Gemma-2 ``hidden_states[-2]`` of the 256 left-padded Gemma ids.

``ReleaseTextEncoder`` is the single definition of that computation. The editor
(``editmgt_jax.editor.ReleaseTextSide``) runs it on host-tokenised prompts, and the trainer
(``editor.text.kind = "release"``) runs the same module frozen inside its jitted step, so text
states seen in training are the ones inference computes. Parameters: ``{"clip": ..., "gemma": ...}``,
the ``clip`` and ``gemma`` components of a model checkpoint.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from editmgt_jax.models.text.clip import CLIPTextConfig, CLIPTextModelWithProjection
from editmgt_jax.models.text.gemma2 import Gemma2Config, Gemma2Encoder


class ReleaseTextEncoder(nnx.Module):
    """``(clip_ids [B, 77], gemma_ids [B, 256]) -> (text_states [B, 256, hidden], pooled [B, P])``."""

    def __init__(self, clip: CLIPTextModelWithProjection, gemma: Gemma2Encoder):
        self.clip = clip
        self.gemma = gemma

    @classmethod
    def create(cls, clip_cfg: CLIPTextConfig, gemma_cfg: Gemma2Config, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32) -> "ReleaseTextEncoder":
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        return cls(CLIPTextModelWithProjection(clip_cfg, **kw), Gemma2Encoder(gemma_cfg, **kw))

    @property
    def states_dim(self) -> int:
        return self.gemma.config.hidden_size

    @property
    def pooled_dim(self) -> int:
        return self.clip.config.projection_dim

    def __call__(self, clip_ids: jax.Array, gemma_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        pooled = self.clip(clip_ids.astype(jnp.int32))[0]
        states = self.gemma(gemma_ids.astype(jnp.int32))
        return states, pooled


__all__ = ["ReleaseTextEncoder"]
