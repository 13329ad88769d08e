"""A token-local tokenizer for the synthetic edits (an alternative to configs/vq_synthetic.py): 64 px,
x4 down-sampling (16x16 ids), a patch encoder and finite scalar quantisation with levels
(8, 8, 6, 5) = 1920 codes.

    python -m train.build_dataset synthetic_edits --data-dir workdirs/data
    python -m train.main --config configs/vq_synthetic_local.py --workdir workdirs/vq_synthetic_local

1,600 steps of batch 8 (16 images: source and target of each edit), about 21 min on two CPU cores
(1.3 steps/s with other work running). Held-out reconstruction PSNR at 64 px (1000 test images,
source and target): 23.2 dB, 637 of the 1920 codes in use on them.

Why a patch encoder: an edit should leave the ids of everything it does not touch unchanged, so
the editor can copy them and the changed ids mark the edit. The convolutional encoder (GroupNorm
over the whole image, a receptive field of several ids) re-coded the neighbourhood of every edited
object: 15-23% of the 16x16 ids changed in object edits whose pixels touch 8-11% of the 4x4
patches. With each id a function of its own 4 x 4 patch (``encoder="patch"``,
editmgt_jax.models.patch_encoder), object edits change 5-7% of the ids and the rest are the source's
exactly; the reconstruction is as good (23.0 dB before, same steps).

Why FSQ: nearest-codeword VQ with nothing restarting dead codewords collapses (1024 codewords: 7%
in use at step 700); FSQ has no codebook to collapse and no codebook or commitment loss. The
dataset is the 128 px `synthetic_edits` set, resized to 64 px by the pipeline.
"""

from configs import vq_synthetic

DATASET = vq_synthetic.DATASET
VQ_SYNTHETIC_LOCAL = dict(vq_synthetic.VQ_SYNTHETIC, fsq_levels=(8, 8, 6, 5), num_vq_embeddings=1920,
                          encoder="patch")


def get_config():
    c = vq_synthetic.get_config()
    c.vq.model = dict(VQ_SYNTHETIC_LOCAL)
    return c
