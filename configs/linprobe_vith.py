"""Linear probing of a pre-trained MAE ViT-H/14 on ImageNet-1k: the official recipe.

    python -m maejax.main --config=configs/linprobe_vith.py --workdir=workdirs/linprobe_vith \
        --config.init_from=workdirs/mae_vith --config.dataset.data_dir=$TFDS_DATA_DIR

init_from: a pre-training workdir (its newest checkpoint) or a maejax.convert
output of the official weights (maejax.recipes.linprobe_imagenet).
"""

from maejax.recipes import linprobe_imagenet, no_argument


def get_config(arg=None):
    no_argument(arg)
    return linprobe_imagenet("H/14")
