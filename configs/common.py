"""Shared training config: every field the trainer reads, with the release's optimizer defaults.

Task configs (``configs/editor_*.py``, ``configs/vq_*.py``) start from ``base()`` and fill in the
model and data. Any field can be overridden on the command line:

    python -m train.main --config configs/editor_tiny.py --workdir /tmp/run \\
        --config.train.num_steps=200 --config.mesh.fsdp=2 --config.precision.compute_dtype=bfloat16
"""

import ml_collections

from editmgt_jax.training.fields import EDITOR_DEFAULTS


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "editor"                 # "editor" (masked-token transformer) or "vq" (tokenizer)
    c.seed = 0                        # parameter init and training randomness (masks, dropout)

    # Device mesh (data, fsdp, tensor); one axis may be -1 to take the remaining devices.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # Logical-axis rules as (name, mesh axis or None) pairs; empty = editmgt_jax.parallel.DEFAULT_RULES.
    c.logical_axis_rules = ()
    # Fail when more than this fraction of parameter bytes stays replicated on a model-parallel mesh.
    c.max_replicated_fraction = 0.05
    # All-gather weights over fsdp for compute (see editmgt_jax.training.step.make_steps).
    c.gather_fsdp = True

    # Mixed precision: parameters (master weights) in param_dtype, activations in compute_dtype.
    c.precision = ml_collections.ConfigDict(dict(compute_dtype="float32", param_dtype="float32"))
    c.remat = False                   # recompute each transformer block's activations in backward

    # AdamW as released: lr 1e-4, betas (0.9, 0.999), weight decay 0.01 (not on biases, norm
    # scales, embeddings), constant LR, global-norm clipping at 10.
    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=10.0,
        schedule="constant",          # "constant" | "warmup_constant" | "cosine"
        warmup_steps=0, decay_steps=0, min_lr_ratio=0.0,
        grad_accum_steps=1,           # optax.MultiSteps: one update every k steps
    ))

    c.train = ml_collections.ConfigDict(dict(
        batch_size=16,                # global batch (split evenly over processes)
        num_steps=1000,               # optimizer calls (micro-steps under accumulation)
        log_every=10,                 # TensorBoard scalars and progress-bar refresh
        checkpoint_every=500,
        keep_checkpoints=3,
        async_checkpoints=True,
        eval_every=0,                 # 0 = no periodic evaluation
        eval_batches=4,
        edit_eval_every=0,            # editor: held-out sampled edits (edit success, changed-token
        edit_eval_per_category=10,    #   accuracy; editmgt_jax.training.edit_eval); 0 = off
        sample_every=0,               # 0 = no periodic sample grids
        num_samples=4,                # images per sample grid
        sample_steps=8,               # editor: decoding steps of the sample edits
        export=True,                  # write a model checkpoint (Editor.load) at the end
        loss_plot=True,               # loss-curve PNG at the end
    ))

    # Data: a TFDS dataset built with `python -m train.build_dataset`, or pre-tokenised records
    # (`python -m train.pretokenize`, set tokens_dir). Fields of editmgt_jax.data.pipeline.
    c.data = ml_collections.ConfigDict(dict(
        name="synthetic_edits/small", data_dir="~/tensorflow_datasets", split="train",
        tokens_dir="", eval_split="test", eval_tokens_dir="",
        resolution=64, crop="center", seed=0, shuffle=True, worker_count=0,
        read_threads=2, read_buffer_size=4,
    ))

    # Fine-tuning: a model checkpoint folder (converted release or exported run) to start from.
    c.init_from = ""

    # Every scalar field of config.editor with its default (editmgt_jax.training.fields); editor task
    # configs add the model: transformer, text.
    c.editor = ml_collections.ConfigDict(EDITOR_DEFAULTS)
    # LoRA fine-tuning of the transformer (editmgt_jax.models.lora): only the adapters train and are
    # checkpointed; needs init_from. rank/alpha as the official README's --lora_r 32 --lora_alpha 128,
    # targets as its trainer's --lora_target_modules (the image-stream q/k/v projections).
    c.editor.lora = ml_collections.ConfigDict(dict(enabled=False, rank=32, alpha=128.0,
                                                   targets=("to_q", "to_k", "to_v")))
    c.vq = ml_collections.ConfigDict()
    return c
