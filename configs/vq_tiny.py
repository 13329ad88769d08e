"""A tiny VQ tokenizer on 64 px synthetic edits: x4 down-sampling (16x16 ids), 64 codewords.

    python -m train.main --config configs/vq_tiny.py --workdir runs/vq_tiny
"""

from configs import common

VQ_TINY = dict(
    block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=8, num_vq_embeddings=64,
    norm_num_groups=8,
)


def get_config():
    c = common.base()
    c.task = "vq"
    c.optim.learning_rate = 1e-3
    c.optim.schedule = "warmup_constant"
    c.optim.warmup_steps = 20
    c.train.batch_size = 16
    c.train.num_steps = 2000
    c.train.checkpoint_every = 500
    c.vq.model = dict(VQ_TINY)
    c.vq.l1_weight = 1.0               # reconstruction |x - x'|
    c.vq.l2_weight = 0.0               # reconstruction (x - x')^2
    c.vq.codebook_weight = 1.0         # ||e - sg(z)||^2: moves codewords to the encoder outputs
    # ||z - sg(e)||^2: keeps encoder outputs near their codewords. Under Adam the codewords move at
    # the learning rate whatever the codebook weight, so the encoder must be held back instead:
    # at 0.25 the latents drift away from the codebook and the VQ terms grow.
    c.vq.commitment_weight = 1.0
    return c
