"""Fine-tuning stage of the default editor: the token-local editor (configs/editor_synthetic_local.py)
trained further with half of its examples fully masked.

    python -m train.main --config configs/editor_synthetic_edit.py --workdir workdirs/editor_synthetic_edit

Why: the first stage learns to copy the source (held-out masked-token accuracy 0.87) but not to edit
from the instruction alone: with the whole target masked, as at the sampler's first step, it
predicts 15% of the ids the edit changes, 74% once 40% of the target is visible. The cosine mask
schedule masks everything almost never (mean ratio 2/pi), so the partly visible target answers the
question the instruction should. Masking half of the examples entirely (``editor.full_mask_prob``)
trains the step the sampler relies on most.
"""

from configs import editor_synthetic_local

STAGE_1 = "workdirs/editor_synthetic_local/model"


def get_config():
    c = editor_synthetic_local.get_config()
    c.init_from = STAGE_1
    c.editor.full_mask_prob = 0.5
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 50
    c.optim.decay_steps = 3000
    c.train.num_steps = 3000
    return c
