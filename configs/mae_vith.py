"""MAE ViT-H/14 pre-training on ImageNet-1k: the official recipe.

    python -m maejax.main --config=configs/mae_vith.py --workdir=workdirs/mae_vith \
        --config.dataset.data_dir=$TFDS_DATA_DIR

800 epochs, effective batch 4096 (lr = 1.5e-4 * 4096 / 256), AdamW (0.9, 0.95),
weight decay 0.05, 40 warmup epochs then half-cycle cosine, norm-pix targets,
RandomResizedCrop(224, scale 0.2-1) + flip, bfloat16 compute
(maejax.recipes.mae_pretrain_imagenet).
"""

from maejax.recipes import mae_pretrain_imagenet, no_argument


def get_config(arg=None):
    no_argument(arg)
    c = mae_pretrain_imagenet("H/14")
    c.model.remat = True  # recompute ViT-H activations in the backward pass
    return c
