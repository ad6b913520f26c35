"""Fine-tuning of a pre-trained MAE ViT-B/16 on ImageNet-1k: the official recipe.

    python -m maejax.main --config=configs/finetune_vitb.py --workdir=workdirs/finetune_vitb \
        --config.init_from=workdirs/mae_vitb --config.dataset.data_dir=$TFDS_DATA_DIR

init_from: a pre-training workdir (its newest checkpoint) or a maejax.convert
output of the official weights (maejax.recipes.finetune_imagenet).
"""

from maejax.recipes import finetune_imagenet, no_argument


def get_config(arg=None):
    no_argument(arg)
    return finetune_imagenet("B/16")
