"""DiffMAE ViT-B/16 pre-training on ImageNet-1k.

    python -m maejax.main --config=configs/diffmae_vitb.py --workdir=workdirs/diffmae_vitb \
        --config.dataset.data_dir=$TFDS_DATA_DIR

MAE's encoder and recipe (800 epochs, batch 4096, blr 1.5e-4, 40 warmup
epochs, bfloat16) with DiffMAE's cross-self decoder (512 wide, 8 blocks, wired
top-down to the encoder), T = 1000 'linear_pow' (rho 0.8) noise on the masked
patches only, x0-prediction, pixel targets (maejax.recipes.diffmae_pretrain_imagenet).
Inpaint afterwards with --config.task=sample.
"""

from maejax.recipes import diffmae_pretrain_imagenet, no_argument


def get_config(arg=None):
    no_argument(arg)
    return diffmae_pretrain_imagenet("B/16")
