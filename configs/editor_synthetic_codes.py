"""The default editor, one stage from scratch: the token-local editor (configs/editor_synthetic_local.py)
with its embedding and logits head initialised from the tokenizer's picture of each code
(``editor.code_embedding_init``) and half of its examples fully masked (``editor.full_mask_prob``).

    python -m train.main --config configs/editor_synthetic_codes.py --workdir workdirs/editor_synthetic_codes
"""

from configs import editor_synthetic_local


def get_config():
    c = editor_synthetic_local.get_config()
    c.editor.code_embedding_init = "vq_patches"
    c.editor.full_mask_prob = 0.5
    # The cosine schedule is laid out for 4,000 steps; the first stage stops at 1,500 (its learning
    # rate still at 0.7 of the peak) and the second stage (configs/editor_synthetic_balanced.py) goes on.
    c.optim.decay_steps = 4000
    c.train.num_steps = 1500
    c.train.edit_eval_every = 1000
    return c
