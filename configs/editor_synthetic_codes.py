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
    c.optim.decay_steps = 4000
    c.train.num_steps = 4000
    c.train.edit_eval_every = 1000
    return c
