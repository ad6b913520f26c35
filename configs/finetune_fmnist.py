"""Fine-tuning on Fashion-MNIST, CPU-sized, from a *_fmnist pre-training.

    python -m maejax.main --config=configs/finetune_fmnist.py --workdir=workdirs/finetune_fmnist \
        --config.init_from=workdirs/mae_fmnist

init_from: workdirs/mae_fmnist (make demo), workdirs/diffmae_fmnist, or
'random' for the from-scratch baseline. 470 steps of batch 256 (2 epochs),
evaluated on the 10,000 test images (maejax.recipes.fmnist_classifier).
"""

from maejax.recipes import fmnist_classifier, no_argument


def get_config(arg=None):
    no_argument(arg)
    return fmnist_classifier("finetune")
