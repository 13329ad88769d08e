"""A tiny editor on 64 px synthetic edits: 16x16 token grid, width 32, trains on one CPU.

    python -m train.build_dataset synthetic_edits/small --data-dir ~/tensorflow_datasets
    python -m train.main --config configs/vq_tiny.py --workdir runs/vq_tiny
    python -m train.main --config configs/editor_tiny.py --workdir runs/editor_tiny \\
        --config.editor.vq_checkpoint=runs/vq_tiny/model

The VQ tokenizer is frozen and runs inside the train step (set ``editor.vq_checkpoint``), or the
data comes pre-tokenised (``data.tokens_dir``). Text: a small encoder trained with the editor over
the synthetic set's word vocabulary.
"""

from configs import common
from configs.vq_tiny import VQ_TINY
from editmgt_jax.data.synthetic_edits import SYNTHETIC_VOCAB

CODEBOOK = VQ_TINY["num_vq_embeddings"]


def get_config():
    c = common.base()
    c.task = "editor"
    c.optim.learning_rate = 1e-3       # small model, small batch: the release's 1e-4 is too slow here
    c.optim.schedule = "warmup_constant"
    c.optim.warmup_steps = 20
    c.train.batch_size = 16
    c.train.num_steps = 2000
    c.train.checkpoint_every = 500
    c.editor.transformer = dict(
        num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
        vocab_size=CODEBOOK + 1, codebook_size=CODEBOOK,   # last id = mask token
    )
    c.editor.text = dict(
        kind="small",                  # "small" (trained here) | "precomputed" (states in the batch)
        vocab_size=len(SYNTHETIC_VOCAB) + 2, max_length=24, width=32, num_layers=1, num_heads=2,
    )
    c.editor.cond_dropout = 0.1        # classifier-free guidance: drop the instruction 10% of the time
    c.editor.timestep_convention = "mask_fraction"   # see editmgt_jax.training.losses
    c.editor.aesthetic = 6.0
    c.editor.image_size = 64           # micro-conditions when the batch carries none
    c.editor.vq_checkpoint = ""        # model checkpoint with a "vq" component; "" = random VQ
    # text.kind="precomputed" + cond_dropout: .npz with the empty prompt's text_states and pooled
    c.editor.uncond_text = ""
    c.vq.model = dict(VQ_TINY)         # the tokenizer's architecture (for a random or loaded VQ)
    return c
