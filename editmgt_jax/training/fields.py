"""The editor task's config fields (``config.editor``), each declared once with its default.

``configs/common.py`` builds ``config.editor`` from :data:`EDITOR_DEFAULTS` (task configs add the
model: ``transformer``, ``text``; ``lora`` is declared there too). The trainer reads the fields as
attributes, never with a fallback of its own, and its resume check reads a field a saved config does
not name as this default (what a checkpoint written before the field was declared was trained with).
The declarations live in the library, not in ``configs``, so that the library never imports the
config files (they import it).
"""

from __future__ import annotations

from editmgt_jax.models.embeddings import DEFAULT_AESTHETIC

EDITOR_DEFAULTS = dict(
    cond_dropout=0.1,                 # classifier-free guidance: drop the instruction this often
    timestep_convention="mask_fraction",   # "mask_fraction" | "release" (editmgt_jax.training.losses)
    aesthetic=DEFAULT_AESTHETIC,      # last micro-condition fed in training and exported
    image_size=0,                     # micro-conditions when the batch carries none (0: the batch's size)
    vq_checkpoint="",                 # model checkpoint with a "vq" component (the frozen tokenizer)
    uncond_text="",                   # text.kind="precomputed" + cond_dropout: .npz of the empty prompt
    changed_weight=1.0,               # loss weight of the positions the edit changes
    full_mask_prob=0.0,               # fraction of examples with the whole target masked
    changed_share=0.0,                # > 0: per-example loss, this share on the changed positions
    region_loss_weight=0.0,           # > 0: + this times losses.region_attention_loss
    region_loss_blocks=(),            # its blocks; () = the recommended consolidation_blocks
    code_embedding_init="",           # "" | "vq_patches" (editmgt_jax.training.code_init)
    sampler_defaults={},              # recommended SamplerSettings fields, exported with the model
)
