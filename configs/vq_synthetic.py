"""The default model's VQ tokenizer: 64 px synthetic edits, x4 down-sampling (16x16 ids), 128 codewords.

    python -m train.build_dataset synthetic_edits --data-dir workdirs/data
    python -m train.main --config configs/vq_synthetic.py --workdir workdirs/vq_synthetic

Sized to train on two CPU cores in about 20 minutes (8 + 16 + 32 channels: ~8 GFLOP per step of
16 images). The dataset is the 128 px `synthetic_edits` set, resized to 64 px by the pipeline.

Codebook size: 128 codewords are 95% in use after 800 steps; with 1024 (same everything else) only
7% were in use at step 700 and the reconstruction was no better, since nothing restarts dead
codewords, so the smaller codebook carries as much information and gives the editor fewer classes.
"""

from configs import common

VQ_SYNTHETIC = dict(
    block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=8, norm_num_groups=8,
    quantizer="fsq", fsq_levels=(8, 5, 5, 5), num_vq_embeddings=1000,
)
DATASET = "synthetic_edits/default"


def get_config():
    c = common.base()
    c.task = "vq"
    c.data.name = DATASET
    c.data.data_dir = "workdirs/data"
    c.data.resolution = 64
    c.optim.learning_rate = 2e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 50
    c.optim.decay_steps = 1600
    c.optim.min_lr_ratio = 0.05
    c.train.batch_size = 8             # 16 images a step: source and target of each edit
    c.train.num_steps = 1600
    c.train.log_every = 20
    c.train.checkpoint_every = 250
    c.train.sample_every = 500
    c.vq.model = dict(VQ_SYNTHETIC)
    c.vq.l1_weight = 1.0
    c.vq.l2_weight = 1.0               # squared error sharpens colours (PSNR is what we report)
    c.vq.codebook_weight = 0.0         # FSQ has no codebook and needs no commitment term
    c.vq.commitment_weight = 0.0
    return c
