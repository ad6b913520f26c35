"""MAE ViT-L/16 pre-training on ImageNet-1k: the official recipe.

    python -m maejax.main --config=configs/mae_vitl.py --workdir=workdirs/mae_vitl \
        --config.dataset.data_dir=$TFDS_DATA_DIR

800 epochs, effective batch 4096 (lr = 1.5e-4 * 4096 / 256), AdamW (0.9, 0.95),
weight decay 0.05, 40 warmup epochs then half-cycle cosine, norm-pix targets,
RandomResizedCrop(224, scale 0.2-1) + flip, bfloat16 compute
(maejax.recipes.mae_pretrain_imagenet).
"""

from maejax.recipes import mae_pretrain_imagenet, no_argument


def get_config(arg=None):
    no_argument(arg)
    return mae_pretrain_imagenet("L/16")
