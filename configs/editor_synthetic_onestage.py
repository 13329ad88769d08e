"""The default editor in one stage from scratch: the three-stage recipe (configs/editor_synthetic_codes.py
-> _balanced.py -> _region.py) folded into one run, on a transformer that works on a 2x2-pooled grid
as the release does (``downsample``), so a step costs about a third of the 16x16-grid model's.

    python -m train.main --config configs/editor_synthetic_onestage.py --workdir workdirs/editor_onestage

What it combines, from the start:
- the embedding and logits head initialised from the tokenizer's picture of each code
  (``editor.code_embedding_init = "vq_patches"``);
- the per-example loss in which the cells the edit changes carry half of each example's loss
  (``editor.changed_share``);
- the region loss (``editor.region_loss_weight``) on the captured attention of all four blocks, the
  blocks the exported sampler consolidates, so EditMGT's own map finds the edit;
- three quarters of the examples with the whole target masked (``editor.full_mask_prob``): the
  shipped sampler decodes in one greedy step from a fully masked target.

Transformer: 2 dual-stream + 2 single-stream blocks of width 64 with 2 heads of 32, on the 8x8 grid
of 2x2-pooled token cells (``downsample``: the release's 2x2 stride-2 conv in, transposed conv out), so
the sequence is 24 text + 64 image + 64 reference positions instead of 24 + 256 + 256; the
edit-region map has 8x8 cells (8 px at 64 px) and is up-sampled to the 16x16 token grid by the
sampler, as the release's map is.
"""

from configs import editor_synthetic_region

HEADS = 2
HEAD_DIM = 32


def get_config():
    c = editor_synthetic_region.get_config()
    c.init_from = ""
    c.editor.code_embedding_init = "vq_patches"
    c.editor.transformer = dict(c.editor.transformer, downsample=True, num_attention_heads=HEADS,
                                attention_head_dim=HEAD_DIM, axes_dims_rope=(8, 12, 12))
    c.optim.learning_rate = 1.5e-3
    c.optim.warmup_steps = 100
    c.optim.decay_steps = 6000
    c.train.num_steps = 6000
    c.train.checkpoint_every = 250
    c.train.log_every = 50
    c.train.eval_every = 1000
    c.train.edit_eval_every = 1000
    c.train.edit_eval_per_category = 20
    c.train.sample_every = 2000
    # Sampler settings, chosen on the first 350 held-out edits (README, Evaluation): one greedy step,
    # guidance 2, region hold at 0.15 on the map of all four blocks, a cell keeps its source token when
    # the model gives that token at least 0.1, and the 'pixels' composite.
    c.editor.sampler_defaults = dict(c.editor.sampler_defaults, guidance_scale=2.0, keep_source=0.1,
                                     composite="pixels")
    return c
