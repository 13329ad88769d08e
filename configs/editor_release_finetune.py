"""Fine-tune the converted official EditMGT model on CrispEdit-2M with the release's own text side.

    # 1. the official release as a model checkpoint (transformer, VQ, CLIP, Gemma-2, tokenizers)
    python -m editmgt_jax.convert --official /path/to/EditMGT --out ckpt/editmgt-1024
    # 2. CrispEdit-2M as TFDS ArrayRecord, from its local parquet shards (holdout: + validation split)
    python -m train.build_dataset crispedit/holdout --data-dir ~/tensorflow_datasets \\
        --manual-dir /path/to/CrispEdit-2M
    # 3. fine-tune (any field can be overridden: --config.train.batch_size=64 --config.mesh.fsdp=8 ...)
    python -m train.main --config configs/editor_release_finetune.py --workdir runs/editmgt_ft

A checkpoint elsewhere: ``--config.init_from=CKPT --config.editor.vq_checkpoint=CKPT`` (the text
encoders come from ``editor.text.checkpoint``, default ``init_from``).

What trains: the transformer only, starting from ``init_from``. The text side is
``editor.text.kind = "release"``: the checkpoint's frozen CLIP (pooled vector) and Gemma-2
(penultimate hidden states) run inside the jitted step on instructions tokenised on the host with the
checkpoint's ``tokenizer/`` and ``llm_tokenizer/``, exactly as ``Editor`` encodes prompts; they are
sharded over the mesh like everything else but are not in the optimizer state. Condition dropout
replaces 10% of the instructions by the encoders' empty-prompt output. The VQ tokenizer (frozen) is
the checkpoint's too. The transformer is fed the release's timestep convention (a step index), so
the exported ``WORKDIR/model`` samples like the official model; it carries the clip/gemma components
and tokenizers, and ``Editor.load`` / ``python -m infer.edit --checkpoint WORKDIR/model`` use it.

Another dataset: ``--config.data.name=synthetic_edits/small`` (any TFDS edit set the pipeline reads).
"""

from configs import common, editmgt_1024
from editmgt_jax.checkpoints import RELEASE_NEGATIVE_PROMPT
from editmgt_jax.models.transformer import RELEASED_CONFIG as TRANSFORMER
from editmgt_jax.models.transformer import TransformerConfig
from editmgt_jax.models.vq import RELEASED_CONFIG as VQ
from editmgt_jax.models.vq import VQConfig

CHECKPOINT = "ckpt/editmgt-1024"       # python -m editmgt_jax.convert --official RELEASE --out CHECKPOINT
RESOLUTION = 1024


def get_config():
    c = common.base()
    c.task = "editor"
    c.init_from = CHECKPOINT           # transformer weights to fine-tune
    c.data.name = "crispedit/holdout"
    c.data.data_dir = "~/tensorflow_datasets"
    c.data.split = "train"
    c.data.eval_split = "validation"
    c.data.resolution = RESOLUTION
    c.data.crop = "center"
    c.data.worker_count = 4
    # Parameters fully sharded over the devices (ZeRO-3); text encoders and VQ with the same rules.
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.precision.compute_dtype = "bfloat16"   # the transformer's activations; fp32 master weights
    c.remat = True
    c.optim.learning_rate = 1e-5       # a tenth of the release's pre-training rate
    c.optim.schedule = "warmup_constant"
    c.optim.warmup_steps = 500
    c.optim.grad_accum_steps = 1
    c.train.batch_size = 32
    c.train.num_steps = 20000
    c.train.log_every = 20
    c.train.checkpoint_every = 1000
    c.train.eval_every = 1000
    c.train.eval_batches = 8
    c.train.sample_every = 0           # sample grids at 1024 px are slow; see infer.edit instead
    c.editor.transformer = TransformerConfig.from_official(TRANSFORMER).to_dict()
    c.editor.text = dict(
        kind="release",                # frozen CLIP + Gemma-2 of `checkpoint`, run in the step
        checkpoint="",                 # model checkpoint with clip/gemma + tokenizers; "" = init_from
        compute_dtype="float32",       # the encoders' activations (Editor.load's default dtype)
    )
    c.editor.cond_dropout = 0.1
    c.editor.timestep_convention = "release"
    c.editor.aesthetic = 6.0
    c.editor.image_size = RESOLUTION
    c.editor.vq_checkpoint = CHECKPOINT   # the release's VQ (frozen); keep equal to init_from
    c.editor.uncond_text = ""
    c.vq.model = VQConfig.from_official(VQ).to_dict()
    c.editor.sampler_defaults = dict(**editmgt_1024.get_config().sampler, negative_prompt=RELEASE_NEGATIVE_PROMPT)
    return c
