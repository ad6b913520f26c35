"""MAE pre-training on Fashion-MNIST, CPU-sized: the embedded default (`make demo`).

    python -m maejax.main --config=configs/mae_fmnist.py --workdir=workdirs/mae_fmnist

A small ViT (width 128, 6 blocks, patch 4 on 28x28 grey images: 49 patches,
12 visible) with a 64-wide 2-block decoder, pixel targets, batch 256, 400
steps (1.7 epochs): about six minutes on 2 CPU cores. Reads Debian's
dataset-fashion-mnist files (or dataset.manual_dir) and never the network when
they exist (maejax.recipes.fmnist_pretrain).
"""

from maejax.recipes import fmnist_pretrain, no_argument


def get_config(arg=None):
    no_argument(arg)
    return fmnist_pretrain()
