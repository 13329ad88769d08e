"""The released EditMGT model at 1024 px: architecture and the official demo's edit settings.

  from configs import editmgt_1024
  cfg = editmgt_1024.get_config()
  cfg.model.transformer   # official Transformer2DModel config.json fields
  cfg.sampler             # SamplerSettings fields the official demo sets beyond the defaults
"""

import ml_collections

from editmgt_jax.checkpoints import RELEASE_NEGATIVE_PROMPT
from editmgt_jax.models import transformer, vq


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.resolution = 1024
    c.model = ml_collections.ConfigDict()
    c.model.transformer = dict(transformer.RELEASED_CONFIG)
    c.model.vq = dict(vq.RELEASED_CONFIG)
    # The demo's settings: SamplerSettings' defaults (36 steps, guidance 6, reference strength 1.1)
    # plus region hold, consolidation over single-stream blocks 14..22 (global 28..36) and lambda
    # 0.01, what the demo's comments enable.
    c.sampler = ml_collections.ConfigDict(dict(hold_threshold=0.01, consolidation_blocks=tuple(range(28, 37))))
    c.negative_prompt = RELEASE_NEGATIVE_PROMPT
    return c
