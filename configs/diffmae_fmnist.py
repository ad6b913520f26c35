"""DiffMAE pre-training on Fashion-MNIST, CPU-sized (the same data and encoder as mae_fmnist).

    python -m maejax.main --config=configs/diffmae_fmnist.py --workdir=workdirs/diffmae_fmnist

Then inpaint held-out images with the trained model, comparing with MAE:

    python -m maejax.main --config=configs/diffmae_fmnist.py --workdir=workdirs/diffmae_fmnist \
        --config.task=sample --config.compare_mae_from=workdirs/mae_fmnist

Encoder as mae_fmnist (width 128, 6 blocks, patch 4), a 64-wide 2-block
cross-self decoder wired top-down to the encoder, T = 1000 'linear_pow'
(rho 0.8) noise on the masked patches, x0-prediction, 400 steps of batch 256.
"""

from maejax.recipes import fmnist_pretrain, no_argument


def get_config(arg=None):
    no_argument(arg)
    c = fmnist_pretrain()
    c.model.name = "diffmae"
    c.model.decoder.variant = "cross_self"
    c.model.diffusion.timesteps = 1000
    c.model.diffusion.schedule = "linear_pow"
    c.model.diffusion.rho = 0.8
    c.sample.sampler = "ddpm"
    c.sample.steps = 50
    c.sample.num_samples = 4
    c.sample.num_images = 8
    c.sample.mask = "random"
    c.sample.mask_ratio = 0.75
    return c
