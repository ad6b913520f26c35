"""DiffMAE pre-training on Fashion-MNIST, CPU-sized (the same data and encoder as mae_fmnist).

    python -m maejax.main --config=configs/diffmae_fmnist.py --workdir=workdirs/diffmae_fmnist

Then inpaint held-out images with the trained model, comparing with MAE:

    python -m maejax.main --config=configs/diffmae_fmnist.py --workdir=workdirs/diffmae_fmnist \
        --config.task=sample --config.compare_mae_from=workdirs/mae_fmnist

Encoder as mae_fmnist (width 128, 6 blocks, patch 7), a 64-wide 2-block
cross-self decoder wired top-down to the encoder, T = 1000 'linear_pow'
(rho 0.8) noise on the masked patches, x0-prediction, 400 steps of batch 256.
"""

from maejax.recipes import fmnist_diffmae, no_argument


def get_config(arg=None):
    no_argument(arg)
    return fmnist_diffmae()
